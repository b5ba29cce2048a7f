"""Markdown table from a `streamgru bench --json` file (used for benchmarks/RESULTS.md).

    python benchmarks/report.py benchmarks/RESULTS.json
"""

import json
import sys

HEAD = ("| workload | cell | thr | streamgru median (p99) us | ORT run | ORT iobinding | ORT one call "
        "(T steps) | torch | vs ORT run | vs best ORT | vs torch | streamgru GFLOP/s |")


def _ratio(v, sg):
    return f"{v / sg:.2f}x" if v else "-"


def table(path):
    with open(path) as f:
        data = json.load(f)
    rows = {}
    for r in data["results"]:
        rows.setdefault((r["workload"], r["threads"]), {})[r["contender"]] = r
    out = []
    tile = data.get("machine", {}).get("tile")
    if tile:  # recorded since the tile follows the CPU (streamgru.isa)
        shapes = " ".join(f"{r}x{p}" for r, p in zip(tile["rows"], tile["panels"]))
        out += [f"Kernels: `{tile['name']}` tile for `{tile['cpu']}` ({tile['vec_bytes']}-byte "
                f"vectors, {tile['registers']} registers, tiles {shapes} rows x panels, k split "
                f"{tile['k_split']}, NR {tile['panel_width_float32']} float32)"
                f"{' FORCED' if tile.get('forced') else ''}.", ""]
    out += [HEAD, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (wl, t), rs in rows.items():
        sgr = rs["streamgru"]
        sg = sgr["median_us"]
        cells = [f"{rs[n]['median_us']:.1f}" if n in rs else "-"
                 for n in ("ort_run", "ort_iobinding", "ort_sequence", "torch")]
        ort = [rs[n]["median_us"] for n in ("ort_run", "ort_iobinding", "ort_sequence") if n in rs]
        ratios = [_ratio(rs.get("ort_run", {}).get("median_us"), sg),
                  _ratio(min(ort) if ort else None, sg),
                  _ratio(rs.get("torch", {}).get("median_us"), sg)]
        cell = sgr.get("cell", "gru")  # results from before the LSTM rows are all GRU
        out.append(f"| {wl} | {cell} | {t} | {sg:.1f} ({sgr['p99_us']:.1f}) | " + " | ".join(cells + ratios)
                   + f" | {sgr['gflops']:.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/RESULTS.json"))
