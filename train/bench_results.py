"""The benchmark's table and results file: one line per row, and bench/results-<device>-<date>.json, where a
rerun of the same rows replaces them and other rows are kept."""
import datetime
import json
import os
from typing import List, Optional

from shards.common.errors import DataError
from shards.measure import device_name

from .flops import MFU_DEFINITION

def _fmt_seconds(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def table_cells(r: dict) -> List[str]:
    s = r.get("settings", {})
    oom = r.get("status") == "OOM"

    def get(key, fmt=str):
        return fmt(s[key]) if s.get(key) is not None else "-"

    if oom:
        mem = "OOM"
    elif "modelled_peak_mb" in r:
        mem = f"{r['modelled_peak_mb'] / 1024:.2f} GiB MODELLED (+margin {r['modelled_total_mb'] / 1024:.2f})"
    elif "peak_mem_mb" in r:
        mem = f"{r['peak_mem_mb'] / 1024:.1f} GiB ({r.get('peak_reserved_mb', 0) / 1024:.1f} resv)"
    elif "peak_rss_mb" in r:
        mem = f"{r['peak_rss_mb']:.0f} MiB RSS"
    else:
        mem = "-"
    rate = "-"
    for key, unit in (("samples_per_s", "samples/s"), ("images_per_s", "images/s")):
        if key in r:
            rate = f"{r[key]:.3g} {unit}"
    what = r.get("label") or (str(s.get("model") or r.get("what", "-")) + (f", {s['layout']}" if s.get("layout") else ""))
    if s.get("quick"):
        what = "quick: " + what
    return [r["row"], what[:56], get("resolution"),
            get("batch" if "batch" in s else "batch_size"),
            get("base_dtype"), get("checkpointing", lambda v: "on" if v else "off"), mem,
            "OOM" if oom else (_fmt_seconds(r["seconds"]) if "seconds" in r else "-"),
            "OOM" if oom else rate, "OOM" if oom else (f"{r['mfu']:.1%}" if "mfu" in r else "-"),
            f"{r['ratio']:.2f}x of {_fmt_seconds(r['baseline']['seconds'])}" if "ratio" in r
            and isinstance(r.get("baseline"), dict) and "seconds" in r["baseline"] else "-"]


TABLE_HEADER = ["row", "model / what", "resolution", "batch", "base dtype", "checkpointing", "peak mem",
                "step/median time", "samples/s or images/s", "MFU*", "vs baseline**"]


def format_table(rows: List[dict]) -> str:
    """One text table of every row, with the MFU definition under it."""
    lines = [TABLE_HEADER] + [table_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(TABLE_HEADER))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text + ["", "* " + MFU_DEFINITION, "** time / the baseline's time: the same bytes read raw (stream), "
                                                     "the checkpoint copied (merge); details in the JSON"])


def results_path(out_dir: str, device, day: Optional[datetime.date] = None) -> str:
    day = day or datetime.date.today()
    return os.path.join(out_dir, f"results-{device_name(device)}-{day.isoformat()}.json")


def _row_key(r: dict) -> str:
    return json.dumps([r["row"], r.get("what"), r.get("settings")], sort_keys=True, default=str)


def save_results(path: str, rows: List[dict], header: dict) -> None:
    """Write header + rows atomically; rows already in the file with other settings are kept (a GPU session
    may run the matrix in several commands on one day), rows with the same settings are replaced."""
    from shards.common.atomic import write_json

    kept, commands = [], []
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except ValueError:
            raise DataError(f"{path} is not a results file (bad JSON); move it away and run again") from None
        new_keys = {_row_key(r) for r in rows}
        kept = [r for r in old.get("rows", []) if _row_key(r) not in new_keys]
        commands = old.get("commands", [])
        if header.get("matmul_peak_flops") is None and old.get("matmul_peak_flops") is not None:
            header = {**header, "matmul_peak_flops": old["matmul_peak_flops"]}  # measured by an earlier train run
    if header["command"] not in commands:
        commands = commands + [header["command"]]
    # default=str: a row from another stage may hold a value JSON has no type for (a path object, a dtype).
    write_json(path, json.loads(json.dumps({**header, "commands": commands, "rows": kept + rows}, default=str)))


def check_row(r, source: str) -> None:
    """A row from another stage's bench must follow the contract in this module's docstring."""
    if not isinstance(r, dict) or not isinstance(r.get("row"), str) or not isinstance(r.get("what"), str) \
            or not isinstance(r.get("settings"), dict):
        raise DataError(f"{source} returned a row without the keys row (str), what (str), settings (dict): {r!r}"[:300])
