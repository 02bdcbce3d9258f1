"""Where a run's time went: the stages its manifests recorded (io_utils.STAGES), with seconds,
work rate (tokens/s, items/s, answers/s) and share of each process's wall time. The demo prints
it at its end:

    python scripts/stage_times.py persona_loras/SmolLM2-135M-Instruct/evil/manifest.json results/demo_evil/manifest.json

Stages under half a second (results reused from an earlier run) are summed into one line."""

from pathlib import Path

from io_utils import ArgumentParser, PersonaLoRAError, read_json_object, run_cli

QUICK = 0.5  # seconds: a stage this short reused its results


def stage_rows(manifest: dict) -> list[tuple[str, float, str]]:
    """(stage, seconds, rate) per recorded stage, quick ones folded together, then what no stage
    covered (imports, checks, writing outputs)."""
    rows, quick, quick_seconds = [], 0, 0.0
    for stage in manifest.get("stages", []):
        if stage.get("within"):
            continue  # part of an outer stage's time (e.g. a judge loading its model while scoring)
        if stage["seconds"] < QUICK:
            quick, quick_seconds = quick + 1, quick_seconds + stage["seconds"]
            continue
        rate = f"{stage['count'] / stage['seconds']:,.1f} {stage['unit']}/s" if stage.get("unit") and stage["count"] else ""
        rows.append((stage["stage"], stage["seconds"], rate))
    if quick:
        rows.append((f"{quick} stages reused or trivial", quick_seconds, ""))
    covered = sum(seconds for _, seconds, _ in rows)
    rows.append(("other (imports, checks, writing)", max(0.0, manifest["seconds"] - covered), ""))
    return rows


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("manifests", nargs="+", help="manifest.json files written by the stage scripts")
    args = parser.parse_args()
    manifests = []
    for path in args.manifests:
        manifest = read_json_object(Path(path), "manifest")
        if "seconds" not in manifest:
            raise PersonaLoRAError(f"{path} is not a stage manifest (no 'seconds'); pass the manifest.json a stage script wrote")
        manifests.append((path, manifest))
    total = sum(m["seconds"] for _, m in manifests)
    print(f"\n== where the time went ({total:,.0f} s in {len(manifests)} processes) ==")
    for path, manifest in manifests:
        print(f"{manifest['command'].split()[0]} ({manifest['seconds']:,.0f} s; {path})")
        for name, seconds, rate in stage_rows(manifest):
            print(f"  {name[:48]:48s} {seconds:8.1f} s {100 * seconds / total:5.1f} %  {rate}")


if __name__ == "__main__":
    run_cli(main)
