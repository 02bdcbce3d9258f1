"""Peak memory of projecting a finetune onto a persona diff: streaming (cal_weight_projection.py)
against loading both checkpoints whole.

    python bench/bench_projection.py [--workdir bench/out/projection] [--hidden 2048 --layers 8]

Builds a synthetic Llama-architecture checkpoint pair of ≥ 1 GB each in bf16 (original, and
original + a small change in every projection) and a random rank-16 persona diff, once. Then, in a
fresh process per method, projects the finetune and samples /proc/self/status every millisecond:
RssAnon (anonymous memory: what the process really needs) and VmRSS (which also counts
memory-mapped file pages; the kernel can drop those at will). Prints the ratio of the two methods.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

import lora_utils as lu


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Peak(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.anon, self.rss, self.running = 0, 0, True

    def run(self):
        while self.running:
            self.anon, self.rss = max(self.anon, status_bytes("RssAnon")), max(self.rss, status_bytes("VmRSS"))
            time.sleep(0.001)


def build(workdir: Path, hidden: int, layers: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    if (workdir / "done").is_file():
        return
    workdir.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(workdir / "original", max_shard_size="500MB")
    factors = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_proj.weight"):
                param.add_(torch.randn_like(param) * 1e-3)
                factors[name] = (torch.randn(param.shape[0], 16) * 1e-2, torch.randn(16, param.shape[1]) * 1e-2)
    model.save_pretrained(workdir / "finetuned", max_shard_size="500MB")
    lu.PersonaLoRADiff(factors, {"trait": "synthetic", "base_model": str(workdir / "original")}).save(workdir / "diff.pt")
    (workdir / "done").write_text("ok\n")


def worker(workdir: Path, method: str) -> dict:
    from lora_utils import project_checkpoint

    diff = lu.load_lora_diff(workdir / "diff.pt")
    baseline_anon, baseline_rss = status_bytes("RssAnon"), status_bytes("VmRSS")
    peak = Peak()
    peak.start()
    start = time.perf_counter()
    if method == "streaming":
        result = project_checkpoint(lu.SafetensorsCheckpoint(workdir / "original"), workdir / "finetuned", diff)
    else:  # the naive way: both models' weights whole in memory, then the same projection
        from safetensors.torch import load_file

        def whole(folder):
            weights = {}
            for shard in sorted(folder.glob("*.safetensors")):
                weights.update(load_file(str(shard)))
            return weights

        original, finetuned = whole(workdir / "original"), whole(workdir / "finetuned")
        result = lu.WeightProjector.project(
            {n: finetuned[n].float() - original[n].float() for n in diff.module_names if n in original}.items(), diff)
    seconds = time.perf_counter() - start
    peak.running = False
    peak.join()
    return {"method": method, "projection": result["projection"], "seconds": seconds,
            "peak_anon_bytes": peak.anon - baseline_anon, "peak_rss_bytes": peak.rss - baseline_rss}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="bench/out/projection")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--method", choices=["streaming", "whole"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if args.method:
        print(json.dumps(worker(workdir, args.method)))
        return
    build(workdir, args.hidden, args.layers)
    size = sum(f.stat().st_size for f in (workdir / "original").glob("*.safetensors"))
    rows = {}
    for method in ("whole", "streaming"):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors go back to the OS at once
        output = subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--method", method], capture_output=True,
                                text=True, check=True, env=env).stdout
        rows[method] = json.loads(output.strip().splitlines()[-1])
    gib = 1 << 30
    print(f"checkpoint pair: 2 × {size / gib:.2f} GiB (bf16 safetensors, {args.layers} layers, hidden {args.hidden})\n")
    print(f"{'method':10s} {'seconds':>8s} {'peak anon GiB':>14s} {'peak RSS GiB':>13s} {'projection':>12s}")
    for method, row in rows.items():
        print(f"{method:10s} {row['seconds']:8.1f} {row['peak_anon_bytes'] / gib:14.3f} {row['peak_rss_bytes'] / gib:13.3f} "
              f"{row['projection']:12.6f}")
    whole, streaming = rows["whole"], rows["streaming"]
    print(f"\nstreaming / whole: peak anonymous memory {streaming['peak_anon_bytes'] / whole['peak_anon_bytes']:.3f}×, "
          f"peak RSS {streaming['peak_rss_bytes'] / whole['peak_rss_bytes']:.3f}×, time {streaming['seconds'] / whole['seconds']:.2f}×; "
          f"same projection: {abs(streaming['projection'] - whole['projection']) <= 1e-6 * abs(whole['projection'])}")


if __name__ == "__main__":
    main()
