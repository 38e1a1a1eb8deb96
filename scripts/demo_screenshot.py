"""Take docs/demo.png, the README's screenshot of `bindweave demo` on the shipped sprites model, with
headless Chromium (Debian's `chromium`) through Playwright:

    python scripts/demo_screenshot.py [docs/demo.png]

The second request of examples/sprites/requests.jsonl, guidance 1 (as configs/sprites/demo.yaml),
the model's 25 steps; about a minute on two CPU cores. Saved with 128 colours to stay small."""

import json
import socket
import sys
import time
from bindweave.cli.demo import build_demo, load_pipeline, shipped_examples, EXAMPLES
OUT = sys.argv[1] if len(sys.argv) > 1 else "docs/demo.png"
t0 = time.time()
pipe = load_pipeline(None, None)
demo = build_demo(pipe, title="BindWeave: the shipped sprites model", examples=shipped_examples())
s=socket.socket(); s.bind(("127.0.0.1",0)); port=s.getsockname()[1]; s.close()
demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
req = json.loads((EXAMPLES/"requests.jsonl").read_text().splitlines()[1])
from playwright.sync_api import sync_playwright
with sync_playwright() as p:
    b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
    page = b.new_page(viewport={"width":1200,"height":760})
    page.goto(f"http://127.0.0.1:{port}/")
    page.fill("#prompt textarea", req["prompt"])
    page.set_input_files("#references input[type=file]", [str(EXAMPLES/r) for r in req["references"]])
    page.wait_for_timeout(1500)
    page.fill("#seed input", str(req["seed"]))
    page.fill("#guidance input[type=number]", "1")
    page.press("#guidance input[type=number]", "Enter")
    page.click("#generate")
    page.wait_for_timeout(3000)
    page.wait_for_selector("#sheet img[src]", timeout=300000)
    page.wait_for_timeout(1500)
    page.screenshot(path=OUT)
    b.close()
demo.close()
from PIL import Image

Image.open(OUT).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(OUT, optimize=True)
print(f"wrote {OUT} in {time.time() - t0:.0f} s")
