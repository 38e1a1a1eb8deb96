"""8-bit attention against SDPA at the 14B DiT's attention shapes (one process, about 2 minutes on an H100).

    python benchmarks/attention8.py --out attention8.json     # GPU
    python benchmarks/attention8.py --smoke                   # CPU, tiny shapes, fallbacks, seconds

Shapes (B=1, 40 heads of 128): self-attention 39,000 × 39,000; cross-attention 39,000 × 768 without
and with a key mask. Cases: SDPA through ``attention()`` (PyTorch's choice: cuDNN on an H100), SDPA
flash, the FP8 Triton kernel of ``bindweave/model/fp8_attention.py`` (P·V in FP8 or bf16, a few tile
configurations, and its quantization pass alone), and cuDNN's own FP8 SDPA when the cuDNN frontend
imports (``pip install nvidia-cudnn-frontend``, or its wheel in ``.gpu/attn-whl/``, unpacked here).

Each case: median of CUDA-event timings after warm-up, TFLOP/s (4·B·H·Lq·Lk·D FLOPs), speed-up over
SDPA default, and the relative error (Frobenius) of the first ``--rows`` query rows against float32
SDPA on the same rows. Every case is guarded (an error is recorded, the run goes on) and the run
stops starting cases after ``--budget`` seconds.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dit import time_fn  # noqa: E402  (benchmarks/dit.py's timing)

from bindweave.model.attention import attention, attention_backend  # noqa: E402
from bindweave.model.fp8_attention import _quantize, fp8_attention, reference_fp8_attention  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [  # (block_m, block_n, num_warps, num_stages)
    (128, 128, 8, 3),
    (128, 64, 4, 3),
    (128, 128, 8, 2),
    (128, 64, 8, 4),
    (64, 128, 4, 3),
]


def log(message: str) -> None:
    print(f"[attention8 {time.strftime('%H:%M:%S')}] {message}", flush=True)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------------------------------------
# cuDNN's FP8 SDPA (frontend python API), optional.
# ---------------------------------------------------------------------------------------------

def import_cudnn_frontend():
    """``cudnn`` from the environment, else from a wheel in .gpu/attn-whl (unpacked to a temp dir)."""
    try:
        import cudnn
        return cudnn, "installed"
    except ImportError as error:
        first = error
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheels = sorted(glob.glob(str(ROOT / ".gpu" / "attn-whl" / f"nvidia_cudnn_frontend-*-{tag}-*.whl")))
    if not wheels:
        raise ImportError(f"cudnn frontend not installed ({first}) and no {tag} wheel in .gpu/attn-whl")
    target = tempfile.mkdtemp(prefix="cudnn-frontend-")
    with zipfile.ZipFile(wheels[-1]) as archive:
        archive.extractall(target)
    sys.path.insert(0, target)
    import cudnn
    return cudnn, os.path.basename(wheels[-1])


def cudnn_fp8_sdpa(cudnn, q, k, v, out_dtype: str):
    """A callable running cuDNN's FP8 SDPA on per-tensor-quantized q, k, v (B, L, H, D) bf16, and
    its (B, Lq, H, D) output as bf16 (dequantized when ``out_dtype`` is fp8)."""
    B, Lq, H, D = q.shape

    def quant(x):
        scale = x.abs().amax().float().clamp_min(1e-12) / 448.0
        return (x.float() / scale).to(torch.float8_e4m3fn).transpose(1, 2).contiguous(), scale  # (B, H, L, D)

    (q8, sq), (k8, sk), (v8, sv) = quant(q), quant(k - k.mean(dim=1, keepdim=True)), quant(v)
    one = torch.ones(1, 1, 1, 1, device=q.device)
    scalars = {"descale_q": sq.view(1, 1, 1, 1), "descale_k": sk.view(1, 1, 1, 1), "descale_v": sv.view(1, 1, 1, 1),
               "descale_s": one / 448.0, "scale_s": one * 448.0, "scale_o": one}
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    graph = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    tensors = {}
    for name, t in (("q", q8), ("k", k8), ("v", v8)):
        tensors[name] = graph.tensor(name=name, dim=list(t.shape), stride=list(t.stride()),
                                     data_type=cudnn.data_type.FP8_E4M3)
    for name in scalars:
        tensors[name] = graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.FLOAT)
    o, _, amax_s, amax_o = graph.sdpa_fp8(
        q=tensors["q"], k=tensors["k"], v=tensors["v"], descale_q=tensors["descale_q"], descale_k=tensors["descale_k"],
        descale_v=tensors["descale_v"], descale_s=tensors["descale_s"], scale_s=tensors["scale_s"],
        scale_o=tensors["scale_o"], is_inference=True, attn_scale=1.0 / math.sqrt(D), use_causal_mask=False)
    o_torch = torch.empty(B, H, Lq, D, device=q.device,
                          dtype=torch.bfloat16 if out_dtype == "bf16" else torch.float8_e4m3fn)
    o.set_output(True).set_dim(list(o_torch.shape)).set_stride(list(o_torch.stride())).set_data_type(
        cudnn.data_type.BFLOAT16 if out_dtype == "bf16" else cudnn.data_type.FP8_E4M3)
    amax_s_t, amax_o_t = torch.empty(1, 1, 1, 1, device=q.device), torch.empty(1, 1, 1, 1, device=q.device)
    for t in (amax_s, amax_o):
        t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    workspace = torch.empty(graph.get_workspace_size(), device=q.device, dtype=torch.uint8)
    pack = {tensors["q"]: q8, tensors["k"]: k8, tensors["v"]: v8, o: o_torch, amax_s: amax_s_t, amax_o: amax_o_t}
    pack.update({tensors[name]: value for name, value in scalars.items()})

    def call():
        graph.execute(pack, workspace, handle=handle)
        return o_torch

    def output():
        return call().float().transpose(1, 2)  # (B, Lq, H, D); scale_o is 1

    return call, output


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------

def shapes(smoke: bool) -> list[dict]:
    if smoke:
        return [dict(name="self", B=1, Lq=96, Lk=96, H=2, D=32, masked=False),
                dict(name="cross_masked", B=1, Lq=96, Lk=40, H=2, D=32, masked=True)]
    return [dict(name="self", B=1, Lq=39_000, Lk=39_000, H=40, D=128, masked=False),
            dict(name="cross", B=1, Lq=39_000, Lk=768, H=40, D=128, masked=False),
            dict(name="cross_masked", B=1, Lq=39_000, Lk=768, H=40, D=128, masked=True)]


def run(smoke: bool = False, rows: int = 1024, budget: float = 150.0, configs: list | None = None) -> dict:
    started = time.monotonic()
    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if cuda else "cpu")
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "smoke": smoke, "rows_for_error": rows, "shapes": {}}
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    def timer(fn) -> float:  # median ms (CUDA events on a GPU), after 2 warm-up calls
        return time_fn(fn, device, 2, 10 if cuda else 3)["ms"]

    configs = configs or (CONFIGS[:1] if smoke else CONFIGS)
    cudnn = None
    if cuda:
        try:
            cudnn, source = import_cudnn_frontend()
            result["cudnn_frontend"] = f"{cudnn.__version__} ({source}), backend {cudnn.backend_version()}"
        except Exception as error:  # noqa: BLE001 - optional
            result["cudnn_frontend"] = f"unavailable: {type(error).__name__}: {error}"
        log(f"cudnn frontend: {result['cudnn_frontend']}")

    for shape in shapes(smoke):
        B, Lq, Lk, H, D = (shape[key] for key in ("B", "Lq", "Lk", "H", "D"))
        flops = 4 * B * H * Lq * Lk * D
        dtype = torch.bfloat16 if cuda else torch.float32
        g = torch.Generator(device).manual_seed(0)
        q = torch.randn(B, Lq, H, D, device=device, dtype=dtype, generator=g)
        k = (torch.randn(B, Lk, H, D, device=device, dtype=dtype, generator=g)
             + torch.randn(1, 1, H, D, device=device, dtype=dtype, generator=g))  # a shared offset, as real K has
        v = torch.randn(B, Lk, H, D, device=device, dtype=dtype, generator=g)
        mask = None
        if shape["masked"]:
            mask = torch.zeros(B, Lk, dtype=torch.bool, device=device)
            mask[:, : Lk * 2 // 3] = True
        n = min(rows, Lq)
        with torch.no_grad():
            want = attention(q[:, :n].float(), k.float(), v.float(), mask)  # (B, n, H, D) float32
        cases: dict[str, dict] = {}
        result["shapes"][shape["name"]] = {**shape, "flops": flops, "cases": cases}
        log(f"shape {shape['name']}: B={B} Lq={Lq} Lk={Lk} H={H} D={D} masked={shape['masked']}")

        def case(name, fn, output=None):
            if time.monotonic() - started > budget:
                cases[name] = {"skipped": f"time budget of {budget:.0f} s spent"}
                log(f"  {name}: skipped (budget)")
                return
            try:
                with torch.no_grad():
                    out = (output or fn)()
                    ms = timer(fn)
                entry = {"ms": ms, "tflops": flops / ms / 1e9, "error": relative_error(out[:, :n], want)}
                base = cases.get("sdpa_default", {}).get("ms")
                if base:
                    entry["speedup_vs_sdpa_default"] = base / ms
                cases[name] = entry
                log(f"  {name}: {ms:.3f} ms, {entry['tflops']:.0f} TFLOP/s, x{entry.get('speedup_vs_sdpa_default', 1):.2f},"
                    f" error {entry['error']:.2e}")
            except Exception as error:  # noqa: BLE001 - record and go on
                cases[name] = {"error_message": f"{type(error).__name__}: {str(error)[:500]}"}
                log(f"  {name}: FAILED {cases[name]['error_message']}")
            finally:
                if cuda:
                    torch.cuda.empty_cache()

        case("sdpa_default", lambda: attention(q, k, v, mask))
        if mask is None:
            def flash():
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return attention(q, k, v)
            case("sdpa_flash", flash)
        if not cuda:
            def fallback():
                with attention_backend("fp8"):
                    return attention(q, k, v, mask)
            case("fp8_backend_fallback", fallback)
            for pv in ("fp8", "bf16"):
                case(f"reference_pv_{pv}", lambda pv=pv: reference_fp8_attention(q, k, v, mask, pv=pv))
            continue
        for pv in ("fp8", "bf16"):
            for block_m, block_n, warps, stages in configs:
                name = f"fp8_pv_{pv}_m{block_m}_n{block_n}_w{warps}_s{stages}"
                case(name, lambda pv=pv, bm=block_m, bn=block_n, w=warps, s=stages: fp8_attention(
                    q, k, v, mask, pv=pv, block_m=bm, block_n=bn, num_warps=w, num_stages=s))
        bm, bn = configs[0][:2]

        def quantize_only():
            k_mean = torch.mean(k, dim=1, dtype=torch.float32).contiguous()
            _quantize(q, bm, None, torch.float8_e4m3fn, "triton")
            _quantize(k, bn, k_mean, torch.float8_e4m3fn, "triton")
            v_mean = torch.mean(v, dim=1, dtype=torch.float32)
            v_scale = (torch.maximum(v.amax(dim=1).float() - v_mean, v_mean - v.amin(dim=1).float()) / 448.0).contiguous()
            return _quantize(v, bn, v_mean.contiguous(), torch.float8_e4m3fn, "triton", channel_scale=v_scale,
                             transpose=True)

        try:
            cases["fp8_quantize_only_ms"] = timer(quantize_only)
            log(f"  fp8 quantization pass alone: {cases['fp8_quantize_only_ms']:.3f} ms")
        except Exception as error:  # noqa: BLE001
            cases["fp8_quantize_only_ms"] = f"{type(error).__name__}: {error}"
        with torch.no_grad():
            ref_out = reference_fp8_attention(q[:, :n], k, v, mask, pv="fp8")
        cases["reference_pv_fp8_error"] = relative_error(ref_out, want)
        if cudnn is not None and mask is None:
            for out_dtype in ("bf16", "fp8"):
                try:
                    call, output = cudnn_fp8_sdpa(cudnn, q, k, v, out_dtype)
                except Exception as error:  # noqa: BLE001
                    cases[f"cudnn_fp8_out_{out_dtype}"] = {"error_message": f"{type(error).__name__}: {str(error)[:500]}"}
                    log(f"  cudnn_fp8_out_{out_dtype}: FAILED to build: {cases[f'cudnn_fp8_out_{out_dtype}']['error_message']}")
                    continue
                case(f"cudnn_fp8_out_{out_dtype}", call, output)
    result["seconds"] = time.monotonic() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (fallbacks; seconds)")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument("--rows", type=int, default=1024, help="query rows checked against float32 SDPA")
    parser.add_argument("--budget", type=float, default=150.0, help="start no case after this many seconds")
    args = parser.parse_args()
    result = run(smoke=args.smoke, rows=args.rows, budget=args.budget)
    text = json.dumps(result, indent=1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        log(f"wrote {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
