"""GPU check (eighteenth session): the shipped sprites model sampled with FP8 linears on a DiT compiled
per block first (the order `predict` takes: `parallelism.compile` at configure_model, `sampling.fp8`
at the first sampling call) against FP8 on the eager DiT; 64 test requests, two calls each; prints
seconds per call and the pixel difference. REQUESTS: the test split's requests.jsonl.
    python benchmarks/device/compile_then_fp8.py"""
import os
import time

import torch
from bindweave.inference.pretrained import load_pretrained
from bindweave.inference.requests import RequestDataset
from bindweave.model.batch import collate
from bindweave.parallel.per_block import apply_compile

def run(compile_first):
    module = load_pretrained("models/sprites", dtype="bfloat16").to("cuda").eval()
    s = module.sampling
    s.fp8 = True
    if compile_first:
        apply_compile(module.model.dit)
    ds = RequestDataset(os.environ.get("REQUESTS", "data/sprites/test/requests.jsonl"), s.num_frames, s.height, s.width, use_request_sizes=False)
    items = [ds[i] for i in range(64)]
    batch = collate([{k: v for k, v in it.items() if k != "warnings"} for it in items])
    batch["references"] = batch["references"].cuda()
    out = []
    for _ in range(2):
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            v = module.generate(batch)
        torch.cuda.synchronize(); out.append(time.perf_counter() - t)
    print("compile_first" if compile_first else "eager", "seconds", [round(x, 2) for x in out], flush=True)
    return v.int()

a = run(False)
b = run(True)
print("max abs pixel diff compiled-then-fp8 vs eager fp8:", int((a - b).abs().max()), "mean", float((a - b).abs().float().mean()))
