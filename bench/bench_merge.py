"""Merge/restore time and peak extra memory of LoRAMerger against the naive approach.

    python bench/bench_merge.py [--model M] [--lora_diff_path P] [--dtype bfloat16] [--repeats 5]

Naive baseline: clone every projection weight up front, add c·B·A in place, copy the clones back.
LoRAMerger: back up lazily only what a merge touches, recompute W₀ + c·ΔW in row blocks.
Each (method, scenario) runs in a fresh subprocess; a thread samples the process's resident memory
every 0.5 ms during merge+restore, and the peak over the resident memory just before is reported
next to the bytes of the parameters the merge actually touches, and so is the memory still held
after the merge (the backups). Scenarios: the full diff (every
target module), and a partial one (o_proj/down_proj of the middle third of the layers).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

import lora_utils as lu
from model_loading import load_model_and_tokenizer, model_label

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class PeakSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = resident_bytes(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.0005)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, resident_bytes())


def random_diff(model, rank: int, seed: int = 0) -> lu.PersonaLoRADiff:
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name, param in model.named_parameters():
        if name.endswith("_proj.weight"):
            out_features, in_features = param.shape
            factors[name] = (torch.randn(out_features, rank, generator=generator) * 1e-3,
                             torch.randn(rank, in_features, generator=generator) * 1e-3)
    return lu.PersonaLoRADiff(factors, {"trait": "random"})


def scenario_diff(diff: lu.PersonaLoRADiff, scenario: str, num_layers: int) -> lu.PersonaLoRADiff:
    if scenario == "full":
        return diff
    middle = range(num_layers // 3, 2 * num_layers // 3)
    keep = {n: diff.factors[n] for n in diff if lu.module_type(n) in ("o_proj", "down_proj") and lu.layer_index(n) in middle}
    return lu.PersonaLoRADiff(keep, diff.metadata)


def naive_merge(model, diff, coefficient):
    params = dict(model.named_parameters())
    clones = {n: p.detach().clone() for n, p in params.items() if n.endswith("_proj.weight")}  # up front, everything
    with torch.no_grad():
        for name in diff:
            params[name].add_((coefficient * diff.delta(name)).to(params[name].dtype))
    return clones


def naive_restore(model, clones):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, clone in clones.items():
            params[name].copy_(clone)


def worker(args) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, _ = load_model_and_tokenizer(args.model, dtype=args.dtype)
    full = lu.load_lora_diff(args.lora_diff_path) if args.lora_diff_path else random_diff(model, rank=16)
    diff = scenario_diff(full, args.scenario, model.config.num_hidden_layers)
    params = dict(model.named_parameters())
    touched = sum(params[n].numel() * params[n].element_size() for n in diff)
    before = {n: params[n].detach().clone() for n in diff}
    merge_times, restore_times, extra, held = [], [], [], []
    # One discarded round first: the first call of a kernel maps its code pages into resident memory.
    for round_index in range(args.repeats + 1):
        baseline = resident_bytes()
        sampler = PeakSampler()
        sampler.start()
        start = time.perf_counter()
        if args.method == "naive":
            state = naive_merge(model, diff, 1.0)
        else:
            state = lu.LoRAMerger(model).merge_lora_diff(diff, 1.0)
        middle = time.perf_counter()
        held_after_merge = resident_bytes() - baseline
        if args.method == "naive":
            naive_restore(model, state)
        else:
            state.restore_original_weights()
        end = time.perf_counter()
        del state
        peak = sampler.stop()
        if round_index == 0:
            continue
        extra.append(peak - baseline)
        held.append(held_after_merge)
        merge_times.append(middle - start)
        restore_times.append(end - middle)
    exact = all(torch.equal(params[n], before[n]) for n in diff)
    return {"method": args.method, "scenario": args.scenario, "modules": len(diff), "touched_bytes": touched,
            "merge_s": statistics.median(merge_times), "restore_s": statistics.median(restore_times),
            "peak_extra_bytes": max(extra), "held_extra_bytes": statistics.median(held), "restore_bit_exact": exact, "dtype": str(next(model.parameters()).dtype)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--lora_diff_path", default=None, help="default: a random rank-16 diff on every projection")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--method", choices=["naive", "lazy"], help=argparse.SUPPRESS)
    parser.add_argument("--scenario", choices=["full", "partial"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:  # child process
        print(json.dumps(worker(args)))
        return
    rows = []
    for scenario in ("full", "partial"):
        for method in ("naive", "lazy"):
            command = [sys.executable, __file__, "--method", method, "--scenario", scenario, "--dtype", args.dtype,
                       "--repeats", str(args.repeats)]
            command += ["--model", args.model] if args.model else []
            command += ["--lora_diff_path", args.lora_diff_path] if args.lora_diff_path else []
            # A fixed mmap threshold makes glibc return freed tensor memory at once, so resident
            # memory measures what is held rather than what the allocator kept around.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            output = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
    mib = 1 << 20
    print(f"model: {model_label(args.model)}, dtype {rows[0]['dtype']}, median of {args.repeats} runs\n")
    print(f"{'scenario':8s} {'method':6s} {'modules':>7s} {'touched MiB':>11s} {'merge ms':>9s} {'restore ms':>10s} "
          f"{'held MiB':>8s} {'peak extra MiB':>14s} {'peak/touched':>12s} {'bit-exact':>9s}")
    for row in rows:
        print(f"{row['scenario']:8s} {row['method']:6s} {row['modules']:7d} {row['touched_bytes'] / mib:11.1f} "
              f"{row['merge_s'] * 1e3:9.1f} {row['restore_s'] * 1e3:10.1f} {row['held_extra_bytes'] / mib:8.1f} "
              f"{row['peak_extra_bytes'] / mib:14.1f} {row['peak_extra_bytes'] / row['touched_bytes']:12.2f} "
              f"{str(row['restore_bit_exact']):>9s}")
    print()
    for scenario in ("full", "partial"):
        naive, lazy = (next(r for r in rows if r["scenario"] == scenario and r["method"] == m) for m in ("naive", "lazy"))
        print(f"{scenario}: LoRAMerger/naive — merge time {lazy['merge_s'] / naive['merge_s']:.2f}×, restore time "
              f"{lazy['restore_s'] / naive['restore_s']:.2f}×, peak extra memory {lazy['peak_extra_bytes'] / naive['peak_extra_bytes']:.2f}×; "
              f"LoRAMerger holds {lazy['held_extra_bytes'] / lazy['touched_bytes']:.3f}× the touched bytes after merging, "
              f"peak {(lazy['peak_extra_bytes'] - lazy['touched_bytes']) / mib:+.1f} MiB over them (row-block workspace)")


if __name__ == "__main__":
    main()
