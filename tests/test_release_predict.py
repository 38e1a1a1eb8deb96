"""The release layout as a user runs it (issue #20): ``configs/layout/release.yaml`` layered on the
paper config parses; a tiny random model of the release layout runs ``bindweave predict`` end to end;
requests bring precomputed MLLM states (the official ``.pt`` files, this project's feature cache),
and the official OpenS2V-Eval test-case JSON runs through ``benchmarks/release_cases.py``."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from bindweave.inference.mllm_states import read_mllm_states
from conditioners import RelationalConditioner
from encoders.mllm import MLLMEncoder
from encoders.text import T5TextEncoder
from tests.pipeline_helpers import draw_reference
from tests.test_configs import print_config
from tests.tiny_parts import tiny_factory

ROOT = Path(__file__).resolve().parents[1]
TINY_WIDTH = 32  # configs/tiny.yaml's MLLM hidden size


def test_release_layout_on_the_paper_config_parses():
    model = print_config("configs/bindweave-wan2.1-i2v-14b.yaml", "configs/layout/release.yaml")["model"]
    dit = model["dit"]
    assert dit["class_path"].endswith("PretrainedWanDiT") and dit["init_args"]["checkpoint_format"] == "bindweave_release"
    assert {k: dit["init_args"][k] for k in ("in_channels", "dim", "num_layers")} == {
        "in_channels": 36, "dim": 5120, "num_layers": 40}
    image = next(b for b in dit["init_args"]["branches"] if b["name"] == "image")
    assert (image["keep_tokens"], image["overflow_to"]) == (257, "text")
    relational = model["relational"]["init_args"]
    assert relational["attend_t5_padding"] and relational["negative_references"]
    assert relational["negative_prompt"].startswith("Bright tones") and relational["mllm_width"] is None
    assert relational["mllm"]["init_args"]["image_sizing"] == "scaled"
    references = model["multi_reference"]["init_args"]
    assert (references["slot_placement"], references["fixed_slots"], references["mask"], references["video_condition"]) == (
        "before", 4, "letterbox", "grey_latents")
    assert model["identity"]["init_args"]["fixed_references"] == 4
    sampling = model["sampling"]
    assert (sampling["sampler"], sampling["shift"], sampling["sigma_grid"], sampling["guidance_scale"]) == (
        "unipc", 3.0, "diffusers_0.33", 5.0)
    assert model["optimizer"]["init_args"]["lr"] == 5e-6  # the paper config's training settings survive


def states(length: int, width: int = TINY_WIDTH, seed: int = 0) -> torch.Tensor:
    """MLLM states in the release's format: (1, L, C) bfloat16."""
    return torch.randn(1, length, width, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_mllm_states_are_read_from_pt_files_and_the_feature_cache(tmp_path):
    pt = tmp_path / "case_hidden_states.pt"
    torch.save(states(7), pt)
    torch.testing.assert_close(read_mllm_states(str(pt)), states(7)[0].float(), rtol=0, atol=0)
    # one sample of the feature cache: relational.* features, padding removed by the mask
    tokens, mask = torch.randn(9, TINY_WIDTH), torch.arange(9) < 6
    features = {"video_latents": torch.zeros(1), "relational.mllm_tokens": tokens, "relational.mllm_mask": mask,
                "relational.negative_mllm_tokens": tokens[:4].clone(), "relational.negative_mllm_mask": mask[:4].clone()}
    save_file(features, tmp_path / "sample.safetensors")
    torch.testing.assert_close(read_mllm_states(str(tmp_path / "sample.safetensors")), tokens[:6])
    torch.testing.assert_close(read_mllm_states(str(tmp_path / "sample.safetensors"), negative=True), tokens[:4])
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:  # a cache shard: <key>.safetensors members
        data = save(features)
        info = tarfile.TarInfo("clip-7.safetensors")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    torch.testing.assert_close(read_mllm_states(f"{tmp_path / 'shard-000.tar'}#clip-7"), tokens[:6])
    # what a user can get wrong: one line naming the file and the fix
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"hidden": states(3)}, tmp_path / "dict.pt")
    for source, words in ((tmp_path / "missing.pt", "do not exist"), (tmp_path / "empty.pt", "empty file"),
                          (tmp_path / "dict.pt", "not a tensor"), (f"{tmp_path / 'shard-000.tar'}#nope", "no sample")):
        with pytest.raises(ValueError, match=words):
            read_mllm_states(str(source))


def test_precomputed_states_replace_the_mllm_per_sample():
    """Rows with states use them (no MLLM call if every row has them); rows without run the MLLM;
    without an MLLM (``mllm_width``) a row without states is an error naming the request key."""
    relational = RelationalConditioner(text_encoder=tiny_factory(T5TextEncoder), mllm=tiny_factory(MLLMEncoder),
                                       negative_prompt="no")
    relational.build(None)
    given, negative = states(5)[0].float(), states(3, seed=1)[0].float()
    batch = {"prompt": ["a", "b"], "references": torch.zeros(2, 0, 3, 32, 32),
             "mllm_states": [given, None], "negative_mllm_states": [negative, None]}
    features = relational.encode(batch)
    torch.testing.assert_close(features["mllm_tokens"][0, :5], given)
    assert features["mllm_mask"][0].tolist()[:6] == [True] * 5 + [False]
    alone = relational.encode({"prompt": ["b"], "references": torch.zeros(1, 0, 3, 32, 32)})
    computed = features["mllm_tokens"][1, features["mllm_mask"][1]]
    torch.testing.assert_close(computed, alone["mllm_tokens"][0, alone["mllm_mask"][0]])
    torch.testing.assert_close(features["negative_mllm_tokens"][0, :3], negative)
    assert features["negative_rows"].tolist() == [True, True]

    no_mllm = RelationalConditioner(text_encoder=tiny_factory(T5TextEncoder), mllm=None, mllm_width=TINY_WIDTH)
    no_mllm.build(None)
    assert no_mllm.mllm is None and no_mllm.connector[0].in_features == TINY_WIDTH
    features = no_mllm.encode({"prompt": ["a"], "mllm_states": [given], "negative_mllm_states": [negative]})
    assert features["negative_rows"].tolist() == [True]  # negative states without a negative prompt: a negative row
    with pytest.raises(ValueError, match="mllm_states"):
        no_mllm.encode({"prompt": ["a"]})
    with pytest.raises(ValueError, match=r"\(L, 32\)"):
        no_mllm.encode({"prompt": ["a"], "mllm_states": [torch.zeros(4, 7)], "negative_mllm_states": [negative]})
    with pytest.raises(ValueError, match="not both"):
        RelationalConditioner(text_encoder=tiny_factory(T5TextEncoder), mllm=tiny_factory(MLLMEncoder), mllm_width=8)


def fake_official_repo(root: Path) -> Path:
    """The official ``infer`` layout of the three OpenS2V-Eval cases, at the tiny MLLM width: the JSON
    (state paths named ``<case_id>_...`` while the files are ``<case>_...``, as shipped), images and
    ``.pt`` states (1, L, 32) bfloat16; faceobj's positive file is empty (as in a mirror without it)."""
    evaluation = root / "s2v" / "OpenS2V-Eval"
    (evaluation / "Images").mkdir(parents=True)
    (evaluation / "hidden_states").mkdir()
    cases = {"faceobj_1": ["human.png", "dog.png", "school.png"], "singleface_1": ["man.png"],
             "multihuman_14": ["woman1.png", "woman2.png"]}
    for i, (case, images) in enumerate(cases.items()):
        for j, image in enumerate(images):
            draw_reference(evaluation / "Images" / image, (40 * j + 60, 200 - 50 * j, 90), size=(60 + 20 * j, 40))
        stem = case.rsplit("_", 1)[0]
        torch.save(states(20 + i, seed=i), evaluation / "hidden_states" / f"{stem}_hidden_states.pt")
        torch.save(states(25 + i, seed=10 + i), evaluation / "hidden_states" / f"{stem}_hidden_states_negative.pt")
    (evaluation / "hidden_states" / "faceobj_hidden_states.pt").write_bytes(b"")
    (evaluation / "test_case_with_features.json").write_text(json.dumps({case: {
        "img_paths": [f"Images/{image}" for image in images], "prompt": f"the {case} prompt", "synthesis_flag": "Wrong",
        "class_label": [], "hidden_states_path": f"s2v/OpenS2V-Eval/hidden_states/{case}_hidden_states.pt",
        "hidden_states_path_negative": f"s2v/OpenS2V-Eval/hidden_states/{case}_hidden_states_negative.pt"}
        for case, images in cases.items()}))
    return root


def load_script():
    spec = importlib.util.spec_from_file_location("release_cases", ROOT / "benchmarks" / "release_cases.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_the_official_test_cases_run_through_predict_on_a_tiny_release_model(tmp_path, monkeypatch):
    """The three official cases (JSON -> requests naming the existing files -> .pt states without an
    MLLM -> the tiny release layout -> videos, through --ckpt_path); the empty file fails its request
    in one line and the others still run; ``--stand-ins`` replaces it by random states, said so."""
    monkeypatch.chdir(tmp_path)
    repo = fake_official_repo(tmp_path / "BindWeave")
    script = load_script()
    summary = script.run(repo, tmp_path / "out", width=TINY_WIDTH, steps=2, num_frames=5, height=32, width_px=32)
    cases = summary["cases"]
    assert cases["singleface_1"]["video"] and cases["multihuman_14"]["video"] and not cases["faceobj_1"]["video"]
    assert "empty file" in cases["faceobj_1"]["error"]
    assert cases["singleface_1"]["mllm_states"].startswith("listed singleface_1_hidden_states.pt, named "
                                                          "singleface_hidden_states.pt; real states (21, 32)")
    request = cases["multihuman_14"]["request"]
    assert request["mllm_states"].endswith("multihuman_hidden_states.pt") and len(request["references"]) == 2
    assert (request["num_frames"], request["height"], request["width"]) == (5, 32, 32)
    picked = script.official_requests(repo, tmp_path / "stand-ins", stand_ins=True, width=TINY_WIDTH)
    assert "random stand-in" in picked["faceobj_1"]["mllm_states"]  # the empty file replaced, said so
    request = json.loads((tmp_path / "stand-ins" / "requests.jsonl").read_text().splitlines()[0])
    assert read_mllm_states(request["mllm_states"]).shape == (500, TINY_WIDTH)
