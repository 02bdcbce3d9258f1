"""Make a trained persona small enough to ship with the tests (the llama.cpp runtime check of
tests/test_gguf_export.py uses one, since a fresh machine has none and training one costs minutes).

    python scripts/ship_test_persona.py --lora_diff_path persona_loras/SmolLM2-135M-Instruct/evil/evil_lora_diff.pt \\
        --vector_path persona_vectors/SmolLM2-135M-Instruct/evil_response_avg_diff.pt --rank 2 --output_dir tests/data

Writes <trait>_persona_rank<r>.safetensors: the diff cut to its top r singular directions per
module (PersonaLoRADiff.compress, Eckart–Young), stored in float16, its metadata recording the
source diff's and vector's sha256, the energy kept and the commit it was made at; and
<trait>_response_avg_diff.pt, the vector as extracted. Both written atomically.
"""

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

import lora_utils as lu
from eval.activations import load_vector
from io_utils import ArgumentParser, atomic_path, check_writable_dir, file_identity, positive_int, run_cli


def parse_args():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--lora_diff_path", required=True)
    parser.add_argument("--vector_path", required=True)
    parser.add_argument("--rank", type=positive_int, default=2)
    parser.add_argument("--output_dir", default="tests/data")
    return parser.parse_args()


def main():
    args = parse_args()
    diff = lu.load_lora_diff(args.lora_diff_path)
    vector = load_vector(args.vector_path)
    output_dir = check_writable_dir(args.output_dir, "--output_dir")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    compressed = diff.compress(args.rank)
    trait = diff.metadata.get("trait") or "persona"
    metadata = {**compressed.metadata, "stored_dtype": "float16", "shipped_at_commit": commit,
                "source_diff": {"path": str(args.lora_diff_path), **file_identity(args.lora_diff_path)},
                "source_vector": {"path": str(args.vector_path), **file_identity(args.vector_path)}}
    shipped = lu.PersonaLoRADiff({name: (up.half(), down.half()) for name, (up, down) in compressed.factors.items()}, metadata)
    target = output_dir / f"{trait}_persona_rank{args.rank}.safetensors"
    with tempfile.TemporaryDirectory() as scratch:  # save() writes a .pt and its .safetensors twin: ship the twin
        shipped.save(Path(scratch) / "diff.pt")
        with atomic_path(target) as tmp:
            shutil.copyfile(Path(scratch) / "diff.safetensors", tmp)
    vector_target = output_dir / f"{trait}_response_avg_diff.pt"
    with atomic_path(vector_target) as tmp:
        torch.save(vector.clone(), tmp)
    energy = compressed.metadata["compression"]["energy_kept"]
    print(f"wrote {target} ({target.stat().st_size / 2**20:.2f} MiB; rank {args.rank} keeps {energy:.1%} of ‖ΔW‖²) "
          f"and {vector_target}; sources: {json.dumps({k: metadata[k]['sha256'][:12] for k in ('source_diff', 'source_vector')})}")


if __name__ == "__main__":
    run_cli(main)
