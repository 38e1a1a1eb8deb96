"""The BindWeave LightningModule: conditioners + Wan DiT, trained with rectified flow.

Batch ──VAE──▶ video latent x₀ (B, z, T, h, w)
x_σ = (1−σ)x₀ + σε ──BindWeaveModel.velocity (conditioners, slots, DiT)──▶ v (B, z, T, h, w)
      ──▶ MSE against ε − x₀ (reference slots excluded)

The network is a :class:`bindweave.model.bindweave_model.BindWeaveModel` (``self.model``), the same object the
sampler and the pipeline use; this module adds what is Lightning's: building it in
``configure_model`` (factories, feature caches, exports, parallelism), the loss and condition
dropout, optimisers, and checkpoints (frozen encoders left out, old layouts upgraded).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torch.distributed.tensor import DTensor

from bindweave.model.dit import WanDiT
from bindweave.lightning_compat import built_by_lightning_cli
from bindweave.weights.export import lightning_keys, load_trainable_weights
from bindweave.errors import UserError
from bindweave.model.flow import RectifiedFlow, foreground_weights, sample_from_velocity
from bindweave.model.bindweave_model import BindWeaveModel
from bindweave.inference.sampler import SamplingConfig, predict_batch, sample_videos
from bindweave.training.lora import LoraConfig, apply_lora
from bindweave.weights.lora_formats import lora_trainable_keys
from conditioners.base import Conditioner
from encoders.base import FrozenEncoder, VideoAutoencoder, frozen_prefixes


@contextmanager
def _fixed_seed() -> Iterator[None]:
    """Run under torch seed 0 and leave the global CPU RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


__all__ = ["BindWeave", "SamplingConfig"]  # SamplingConfig lives in bindweave.inference.sampler; re-exported


@dataclass
class ParallelismConfig:
    """How the built model is wrapped for speed and memory (applied in ``configure_model``, from
    outside the model code).

    Args:
        activation_checkpointing: per DiT block: ``none``, ``full`` (keep block inputs only) or
            ``selective`` (keep attention outputs, recompute the rest). Encoders that train
            (``train_encoders``) then recompute per layer too, through their library's switch.
        compile: ``torch.compile`` each DiT block (and the head) separately.
        compile_mode: its ``torch.compile`` mode: ``None`` (default), ``"max-autotune"``,
            ``"max-autotune-no-cudagraphs"``. Not ``"reduce-overhead"`` for training: the blocks
            share one compiled graph, and each block's CUDA-graph replay overwrites the outputs
            the previous block saved for backward (tried on an H100: the fit stops with
            "accessing tensor output of CUDAGraphs that has been overwritten").
        fsdp_param_dtype: FSDP2 compute dtype of the DiT under ``ModelParallelStrategy``
            (None: storage dtype).
        fsdp_reshard_after_forward: free gathered block weights after forward (ZeRO-3 style).
        fsdp_shard_encoders: shard the frozen encoders too (else replicated on every rank).
        sequence_parallel: split each DiT call's video tokens over this many ranks (Ulysses; 1: off).
            Needs ``ModelParallelStrategy`` with ``tensor_parallel_size`` equal to it: the mesh's
            second axis carries the sequence groups, whose ranks read the same batch; FSDP then
            shards over all ranks and gradients are reduced over both axes (docs/distributed.md).
    """

    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    compile: bool = False
    compile_mode: str | None = None
    fsdp_param_dtype: str | None = "bfloat16"
    fsdp_reshard_after_forward: bool = True
    fsdp_shard_encoders: bool = True
    sequence_parallel: int = 1

    def __post_init__(self) -> None:
        if self.compile_mode == "reduce-overhead":
            raise UserError("parallelism.compile_mode: reduce-overhead (CUDA graphs) cannot train per-block compiled "
                             "blocks (each replay overwrites what the previous block saved for backward); use null, "
                             "max-autotune or max-autotune-no-cudagraphs.")


def _flatten(config: object, prefix: str = "") -> dict[str, object]:
    """Nested config dicts as ``{"dit.init_args.dim": 64, ...}`` (lists are leaves)."""
    if not isinstance(config, dict):
        return {prefix: config}
    flat: dict[str, object] = {}
    for key, value in config.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_differences(stored: dict, current: dict) -> list[str]:
    """``"key=stored (this config: current)"`` for each model setting that differs, shape-defining
    ones (the DiT's, then the conditioners') first."""
    before, after = _flatten(stored), _flatten(current)
    keys = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)
            and not k.startswith(("sampling", "_", "init_weights", "feature_cache"))]
    keys.sort(key=lambda k: (not k.startswith("dit"), k))
    return [f"{k.replace('.init_args', '')}={before.get(k)!r} (this config: {after.get(k)!r})" for k in keys]


upgrade_state_dict = lightning_keys  # its name here before it joined model_keys in bindweave.weights.export

class BindWeave(L.LightningModule):
    """Subject-consistent video generation: registry conditioners feeding a Wan2.1 DiT.

    Heavy parts are given as factories and built in :meth:`configure_model`, so ``--help`` and
    ``--print_config`` are instant and a sharding strategy can wrap them as they are built.

    Args:
        dit: factory of the diffusion transformer (trainable).
        vae: factory of the frozen video VAE (encodes videos and references, decodes samples):
            ``encoders.WanVAE`` or anything with its interface (e.g. the fixed ``encoders.PatchVAE``).
        relational: the prompt condition (paper: MLLM + T5, ``RelationalConditioner``); None to omit.
        identity: the reference-appearance condition (paper: CLIP tokens, ``IdentityConditioner``).
        multi_reference: the reference-latent slots (paper: ``MultiReferenceConditioner``).
        extra_conditioners: further conditioners of your own (any :class:`Conditioner` subclass).
            Conditioners feeding the same branch are concatenated in the order relational,
            identity, multi_reference, extras. Separate named slots (rather than one list) let a
            later ``-c`` config replace e.g. only the relational MLLM.
        optimizer: optimizer over the trainable parameters only (default AdamW, lr 5e-6, wd 0.01,
            the paper's constant-lr setup).
        flow_shift: timestep shift used when sampling training timesteps.
        timestep_sampling: distribution of training timesteps (``uniform`` or ``logit_normal``).
        pure_noise_fraction: share of training samples at exactly σ = 1, where only the conditions
            say what the clip holds (:class:`bindweave.model.flow.RectifiedFlow`).
        prediction: what the DiT outputs: ``velocity`` (ε − x₀, Wan and BindWeave) or ``sample``
            (x₀, converted to the velocity (x_σ − x₀)/σ for the loss and the sampler). ``sample``
            learns far faster when a token carries more values than the DiT's width, as in the
            pixel-space sprites model (a patch VAE's 192 channels × 2 × 2 into width 256).
        foreground_weight: loss weight of the latent pixels that differ from their clip's median
            (:func:`bindweave.model.flow.foreground_weights`; 1.0: the plain MSE). For synthetic worlds
            with uniform backgrounds and small subjects, e.g. 10 in ``configs/sprites.yaml``.
        foreground_threshold: how far (in latent units, any channel) from the median counts as foreground.
        loss_space: what the loss compares: ``velocity`` (v̂ with ε − x₀, as Wan trains) or ``sample``
            (x̂₀ = x_σ − σ·v̂ with x₀: the same error weighted σ², with σ clamped at 0.05 as the head's for
            ``prediction: sample``). With ``prediction: sample`` the velocity loss weights each draw 1/σ²
            (up to 400×), so ``sample`` is the loss that goes with it.
        mask_context_padding: mask padded condition tokens out of cross-attention. Wan was trained
            attending to its zero padding; set False to reproduce that exactly.
        sampling: settings of ``predict``.
        parallelism: activation checkpointing, compilation, FSDP2 and sequence-parallel options.
        lora: fine-tune LoRA adapters (PEFT) instead of the full weights
            (:class:`bindweave.training.lora.LoraConfig`); None: train the weights themselves.
        feature_cache: folder written by ``bindweave data cache``: train from its cached features
            (pair it with cached shards, ``data: cached: true``). The VAE and the conditioners'
            encoders are then never built; their sizes and the null condition come from the cache.
            ``predict``, the pipeline and exports ignore it: sampling builds the encoders the config
            names. Leave None to encode online.
        init_weights: an export folder (``bindweave weights export``, ``save_pretrained``) whose
            trainable weights are loaded, strictly, when the model is built: ``predict`` or fine-tune
            from an export without a ``.ckpt`` (e.g. the shipped ``models/sprites``).
        lr_multipliers: a learning rate of their own for parts of the model: parameter-name prefix
            (as ``named_parameters`` gives them, e.g. ``model.conditioners.relational`` or
            ``model.dit.blocks.0``) → multiple of the optimizer's learning rate; the longest matching
            prefix wins, the rest keep the optimizer's rate. Each becomes a param group (a schedule
            scales every group alike).
        train_encoders: pretrained encoders trained with the rest instead of frozen, by module path
            (``conditioners.relational.text_encoder``, ``conditioners.relational.mllm``,
            ``conditioners.identity.image_encoder``; not the VAE, whose latents are the targets).
            Their trained weights join checkpoints and exports (loaded over the pretrained ones);
            a feature cache leaves out their conditioners' features, which are then computed in
            each step from the cached prompts. A learning rate of their own: ``lr_multipliers``
            with ``model.`` before the path.
    """

    def __init__(
        self,
        dit: Callable[[], WanDiT],
        vae: Callable[[], FrozenEncoder],
        relational: Conditioner | None = None,
        identity: Conditioner | None = None,
        multi_reference: Conditioner | None = None,
        extra_conditioners: list[Conditioner] | None = None,
        optimizer: OptimizerCallable | None = None,
        flow_shift: float = 5.0,
        timestep_sampling: Literal["uniform", "logit_normal"] = "uniform",
        pure_noise_fraction: float = 0.0,
        prediction: Literal["velocity", "sample"] = "velocity",
        foreground_weight: float = 1.0,
        loss_space: Literal["velocity", "sample"] = "velocity",
        foreground_threshold: float = 0.05,
        mask_context_padding: bool = True,
        sampling: SamplingConfig = SamplingConfig(),
        parallelism: ParallelismConfig = ParallelismConfig(),
        feature_cache: str | None = None,
        init_weights: str | None = None,
        lora: LoraConfig | None = None,
        lr_multipliers: dict[str, float] | None = None,
        train_encoders: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.train_encoders = list(train_encoders or [])
        for path in self.train_encoders:
            if not path.startswith("conditioners.") or path.count(".") < 2:
                raise UserError(f"train_encoders: {path!r} is not an encoder path; give the path of a conditioner's "
                                "encoder in the model, e.g. conditioners.relational.text_encoder.")
        if self.train_encoders and lora is not None:
            raise UserError("train_encoders and lora together: LoRA trains adapters with the weights frozen; leave out "
                            "one of model.lora or model.train_encoders.")
        for prefix, multiple in (lr_multipliers or {}).items():
            if not multiple > 0:
                raise UserError(f"lr_multipliers: {prefix!r} has {multiple}; give a positive multiple of the learning "
                                "rate (to freeze a part, leave it out of training instead).")
        self.lr_multipliers = dict(lr_multipliers or {})
        # Under LightningCLI the hyperparameters are the config (class_path/init_args dicts), so a
        # checkpoint carries everything needed to rebuild the model (``load_from_checkpoint``).
        # Built in Python, the factories and conditioners are objects: keep them out of the checkpoint.
        from_cli = built_by_lightning_cli()
        heavy = ["dit", "vae", "relational", "identity", "multi_reference", "extra_conditioners", "optimizer",
                 "sampling", "parallelism", "lora"]  # objects: not loadable with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=None if from_cli else heavy)
        self.dit_factory, self.vae_factory = dit, vae
        named = {"relational": relational, "identity": identity, "multi_reference": multi_reference}
        named.update({f"extra_{i}": c for i, c in enumerate(extra_conditioners or [])})
        # The network training and sampling share; the DiT and the VAE join it in configure_model.
        self.model = BindWeaveModel({name: c for name, c in named.items() if c is not None}, prediction,
                                    mask_context_padding)
        self.optimizer_factory = optimizer
        self.flow = RectifiedFlow(shift=flow_shift, timestep_sampling=timestep_sampling,
                                  pure_noise_fraction=pure_noise_fraction)
        if foreground_weight <= 0 or foreground_threshold < 0:
            raise ValueError(f"foreground_weight must be > 0 and foreground_threshold >= 0, got "
                             f"{foreground_weight} and {foreground_threshold}.")
        self.foreground_weight, self.foreground_threshold = foreground_weight, foreground_threshold
        self.loss_space = loss_space
        self.sampling = sampling
        self.parallelism = parallelism
        self.feature_cache = feature_cache
        self.init_weights = init_weights
        self.lora = lora
        # Checkpoints hold trainable weights only; frozen encoders come from their own files.
        self.strict_loading = False

    # -- the model's parts (read-only views of self.model) --------------------------------------

    @property
    def dit(self) -> WanDiT | None:
        """The model's DiT (None until ``configure_model``)."""
        return self.model.dit

    @property
    def vae(self) -> VideoAutoencoder | None:
        """The model's VAE (None until ``configure_model``)."""
        return self.model.vae

    @property
    def conditioners(self) -> nn.ModuleDict:
        """The model's conditioners, by name (``relational``, ``identity``, ..., ``extra_<i>``)."""
        return self.model.conditioners

    # -- building ------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Build the DiT, the VAE and the conditioners' encoders, then check they fit together."""
        if self.dit is not None:
            return
        dit = self.dit_factory()
        self.model.attach(dit, self.build_encoders())
        if self.init_weights is not None:
            if not os.path.exists(self.init_weights):
                raise UserError(
                    f"model.init_weights: {self.init_weights}: no such export folder (relative paths start at "
                    f"{os.getcwd()}); give the folder of `bindweave weights export` or run from the repository root."
                )
            load_trainable_weights(self, self.init_weights)
        if self.lora is not None:
            apply_lora(self.model, self.lora)  # before AC, compile and FSDP: they wrap the adapted blocks
        self._apply_parallelism()

    def build_encoders(self) -> VideoAutoencoder:
        """Build the VAE and the conditioners (frozen encoders and trainable parts) and give the
        model its VAE; with ``feature_cache``, only the conditioners' trainable parts, sized from the
        cache (the VAE is then a stand-in that cannot encode). Returns the VAE. ``bindweave data
        cache`` calls it alone (no DiT)."""
        if self.feature_cache is not None and not self._predicting():
            from bindweave.data.feature_cache import build_from_cache

            live = frozenset(path.split(".")[1] for path in self.train_encoders)  # built whole: they encode in the step
            with _fixed_seed():
                self.model.vae = build_from_cache(self.conditioners, self.feature_cache, live)  # sizes only
            self._unfreeze_trained_encoders()
        else:
            self.model.vae = self._build_vae_and_conditioners()
        return self.vae

    def _build_vae_and_conditioners(self) -> FrozenEncoder:
        """Build the VAE and every conditioner (encoders and trainable parts); returns the VAE.
        Frozen parts built from random tiny configs must be identical in fit and predict runs,
        whatever the global RNG went through: they are built under a fixed seed (no effect on
        pretrained weights)."""
        with _fixed_seed():
            vae = self.vae_factory()
            for conditioner in self.conditioners.values():
                conditioner.build(vae)
        self._unfreeze_trained_encoders()
        return vae

    def _unfreeze_trained_encoders(self) -> None:
        """Unfreeze the encoders ``train_encoders`` names; a path that names none is one line listing those there are."""
        encoders = {name: m for name, m in self.model.named_modules() if isinstance(m, FrozenEncoder) and name}
        for path in self.train_encoders:
            if path not in encoders:
                trainable = sorted(name for name, m in encoders.items() if m.can_train)
                raise UserError(f"model.train_encoders: {path!r} is not an encoder of this model; the encoders it can "
                                f"train: {', '.join(trainable) or 'none'}.")
            encoders[path].unfreeze()  # one line of its own for an encoder that cannot train

    def attach_encoders(self) -> bool:
        """Give a model that trains from a feature cache its VAE and frozen encoders, for sampling
        in the middle of ``fit`` (``SamplingCallback``). The trainable parameters stay the very
        objects the optimizer holds, with their trained values. Returns False when the encoders
        were already there. Not for sharded (FSDP) models."""
        if self.vae.can_encode:
            return False
        device = self.dit.patch_embedding.weight.device
        trained = dict(self.conditioners.named_parameters(remove_duplicate=False))  # the optimizer's objects (a tied one under each name)
        vae = self._build_vae_and_conditioners()  # the same random encoders as build_encoders draws
        for name, parameter in trained.items():
            path, _, attr = name.rpartition(".")
            module = self.conditioners.get_submodule(path)
            rebuilt = getattr(module, attr, None)
            if rebuilt is None or rebuilt.shape != parameter.shape:
                raise RuntimeError(f"Rebuilding the conditioners with encoders changed the trainable weight {name!r}.")
            module.register_parameter(attr, parameter)  # the optimizer's object, not the rebuilt one
        self.model.vae = vae
        self.vae.to(device)
        self.conditioners.to(device)
        return True

    def _predicting(self) -> bool:
        """In ``trainer.predict``: sampling needs the encoders even when training read a feature cache."""
        return self._trainer is not None and self._trainer.state.fn == "predict"

    def _apply_parallelism(self) -> None:
        """Activation checkpointing, compile and (under ModelParallelStrategy) FSDP2, in that order."""
        from bindweave.parallel.per_block import apply_activation_checkpointing, apply_compile
        from bindweave.parallel.fsdp import shard_model, trainable_parts
        from encoders.base import frozen_encoders, pretrained_encoders

        p = self.parallelism
        mesh, divide = self._sequence_parallel_mesh()
        apply_activation_checkpointing(self.dit, p.activation_checkpointing)
        if p.activation_checkpointing != "none":
            for encoder in pretrained_encoders(self.model):
                if encoder.trainable:  # frozen ones keep no activations to begin with
                    encoder.checkpoint_activations()
        if p.compile:
            apply_compile(self.dit, mode=p.compile_mode)
        if mesh is not None:
            shard_model(
                self.dit, frozen_encoders(self), mesh, p.fsdp_param_dtype,
                reshard_after_forward=p.fsdp_reshard_after_forward, shard_encoders=p.fsdp_shard_encoders,
                gradient_divide_factor=divide, trainable=trainable_parts(self.conditioners),
            )

    def _sequence_parallel_mesh(self):
        """With ``sequence_parallel`` N > 1: make the DiT sequence-parallel over the mesh's second
        axis and return (a 1-D mesh over every rank for FSDP, the data-parallel size that divides
        the gradients); else (the strategy's mesh, None)."""
        n = self.parallelism.sequence_parallel
        if n == 1:
            return self.device_mesh, None
        from torch.distributed.device_mesh import init_device_mesh

        from bindweave.parallel.sequence import apply_sequence_parallel

        mesh = self.device_mesh
        if mesh is None or mesh.ndim != 2 or mesh.size(1) != n:
            have = "no device mesh" if mesh is None else f"a mesh of shape {tuple(mesh.shape)}"
            raise UserError(
                f"model.parallelism.sequence_parallel={n} needs trainer.strategy ModelParallelStrategy with "
                f"tensor_parallel_size: {n} (its second mesh axis holds the sequence-parallel groups), got {have}; "
                f"layer configs/strategy/fsdp2.yaml and pass --trainer.strategy.init_args.tensor_parallel_size {n}.")
        apply_sequence_parallel(self.dit, mesh.get_group(1))
        everyone = init_device_mesh(mesh.device_type, (mesh.size(),))  # FSDP shards over dp × sp ranks
        return everyone, float(mesh.size(0))

    # -- training ------------------------------------------------------------------------------

    def flow_loss(
        self, batch: dict, drops: list[list[bool] | None] | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Velocity MSE over the video latent only (never over the reference slots), weighted by
        ``foreground_weight`` where the clean latent differs from its clip's median.

        ``generator`` fixes the noise and timesteps (validation); None uses the global RNG.
        """
        if "video_latents" in batch:  # from a feature cache: no pixels
            latents = batch["video_latents"].float()  # (B, z, T, h, w); a bfloat16 cache is read as float32
            size = [n * self.vae.spatial_compression for n in latents.shape[-2:]]
        else:
            video = batch["video"]  # (B, 3, F, H, W)
            self.model.check_video(*video.shape[2:])
            size = video.shape[-2:]
            latents = self.vae.encode(video)  # (B, z, T, h, w)
        self.model.check_references(batch["references"], *size)
        cond = self.model.encode_conditions(batch, drops)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        sigmas = self.flow.sample_sigmas(latents.shape[0], latents.device, generator)  # (B,)
        noisy = self.flow.noisy(latents, noise, sigmas)
        velocity = self.model.velocity(noisy, sigmas, cond)  # (B, z, T, h, w) float32
        target = self.flow.velocity(latents, noise).float()
        if self.loss_space == "sample":  # compare x̂₀ with x₀: the same error, weighted σ² (σ clamped as the head's)
            min_sigma = 0.05 if self.model.prediction == "sample" else 0.0
            velocity = sample_from_velocity(noisy, velocity, sigmas, min_sigma)  # (B, z, T, h, w) x̂₀
            target = latents.float()
        if self.foreground_weight == 1.0:
            return F.mse_loss(velocity, target)
        weights = foreground_weights(latents, self.foreground_weight, self.foreground_threshold)  # (B, 1, T, h, w)
        return ((velocity - target).pow(2) * weights).mean() / weights.mean()  # the plain MSE's scale

    def training_drops(self, batch_size: int) -> list[list[bool] | None]:
        """Condition dropout of a training batch, per conditioner: sample i's condition is replaced
        by its null condition with probability ``dropout`` (decided on the host: no device sync)."""
        return [
            (torch.rand(batch_size) < c.dropout).tolist() if c.dropout > 0 else None for c in self.conditioners.values()
        ]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.flow_loss(batch, self.training_drops(len(batch["prompt"])))
        # Not prog_bar: Lightning would read it off the GPU every step (callbacks.LossProgressBar shows it).
        self.log("train/loss", loss, batch_size=len(batch["prompt"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Flow loss with noise and timesteps fixed per batch, so curves compare across runs."""
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        loss = self.flow_loss(batch, generator=generator)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]), sync_dist=True)
        return loss

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Same fixed-noise flow loss as validation, logged as ``test/loss``."""
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        loss = self.flow_loss(batch, generator=generator)
        self.log("test/loss", loss, batch_size=len(batch["prompt"]), sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self._param_groups()
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(params, lr=5e-6, weight_decay=0.01)
        else:
            optimizer = self.optimizer_factory(params)
        for group in optimizer.param_groups:  # the factory's rate times each group's multiple
            group["lr"] = group["lr"] * group.get("lr_multiplier", 1.0)
        return optimizer

    def _param_groups(self) -> list:
        """The trainable parameters, in one group per ``lr_multipliers`` entry (longest prefix wins)
        and one for the rest; a plain list without multipliers."""
        named = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        if not self.lr_multipliers:
            return [p for _, p in named]
        prefixes = sorted(self.lr_multipliers, key=len, reverse=True)
        groups: dict[str | None, list] = {}
        for name, p in named:
            match = next((x for x in prefixes if name == x or name.startswith(x.rstrip(".") + ".")), None)
            groups.setdefault(match, []).append(p)
        unused = [x for x in self.lr_multipliers if x not in groups]
        if unused:
            roots = sorted({".".join(name.split(".")[:3]) for name, _ in named})
            raise UserError(f"lr_multipliers: {unused[0]!r} names no trainable parameter; prefixes of the trainable "
                            f"ones: {', '.join(roots[:8])}.")
        return [{"params": ps, **({"lr_multiplier": self.lr_multipliers[x]} if x is not None else {})}
                for x, ps in groups.items()]

    # -- checkpoints ---------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Drop the frozen encoders' weights: checkpoints hold what training changes.

        Sharded (distributed) checkpoints keep them: torch.distributed.checkpoint loads into the
        model's full state dict and has no partial load through Lightning; each rank stores only
        its shard of them."""
        prefixes = tuple(frozen_prefixes(self))
        state = checkpoint["state_dict"]
        if any(isinstance(value, DTensor) for value in state.values()):  # a sharded (distributed) save
            checkpoint["frozen_prefixes"] = list(prefixes)  # lets an export drop them (bindweave.weights.export)
            return
        lora = lora_trainable_keys(self.model)  # a LoRA fine-tune: adapters (+ also_train) only
        for key in [k for k in state if k.startswith(prefixes) or lora is not None and k.removeprefix("model.") not in lora]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Upgrade a checkpoint saved before the model object existed (keys ``dit.*`` and
        ``conditioners.*``, now ``model.dit.*``, ...), then fail loudly, in one line, if a trainable
        weight is missing or has another shape (strict_loading is off only for frozen ones)."""
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = lightning_keys(checkpoint["state_dict"])
        if self.dit is None or "state_dict" not in checkpoint:  # sharded checkpoints load the model separately
            return
        prefixes = tuple(frozen_prefixes(self))
        lora = lora_trainable_keys(self.model)
        own = {k: v for k, v in self.state_dict().items()
               if not k.startswith(prefixes) and (lora is None or k.removeprefix("model.") in lora)}
        stored = checkpoint["state_dict"]
        missing = sorted(set(own) - set(stored))
        wrong = [k for k, v in own.items() if k in stored and tuple(stored[k].shape) != tuple(v.shape)]
        if missing or wrong:
            what = (f"{len(wrong)} weights of other shapes (e.g. {wrong[0]}: {tuple(stored[wrong[0]].shape)} "
                    f"stored, {tuple(own[wrong[0]].shape)} here)" if wrong else
                    f"no {len(missing)} of this model's trainable weights (e.g. {missing[0]})")
            differences = config_differences(checkpoint.get("hyper_parameters", {}), dict(self.hparams))
            made_with = f"; made with {', '.join(differences[:4])}" if differences else ""
            source = self._trainer.ckpt_path if self._trainer is not None else None
            raise UserError(
                f"{source or 'the checkpoint'}: it holds {what}{made_with}: pass the config it was trained with "
                f"(its config.yaml beside the checkpoints) or a checkpoint of this config."
            )

    # -- sampling ------------------------------------------------------------------------------

    def generate(self, batch: dict, config: SamplingConfig | None = None, progress: bool = False) -> torch.Tensor:
        """Sample videos for a batch of requests (``config`` defaults to ``self.sampling``).
        Returns (B, F, H, W, 3) uint8 on the CPU; see :func:`bindweave.inference.sampler.sample_videos`."""
        return sample_videos(self.model, batch, config or self.sampling, progress=progress)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Videos of a batch of requests. A request that fails (bad input, out of memory) is
        reported under ``failed`` and the others still run; see :func:`bindweave.inference.sampler.predict_batch`."""
        return predict_batch(self.model, batch, batch_idx, self.sampling)
