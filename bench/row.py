"""One benchmark row: what each stage's benchmark module reports and `python -m bench` tabulates and saves.

In JSON a row is one flat object whose keys are the field names below, as results files have always held
rows (so a file written before this type existed loads as it is, and old and new rows share one results
file); keys that are not fields are kept in `extra` and written back beside the fields.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from shards.common.errors import DataError

# "modelled": a model of GPU memory on a fake GPU (bench.memory, bench.precompute_memory), never a measurement.
KINDS = ("train", "precompute", "stream", "merge", "modelled")
# "OOM": the device ran out of memory, so the row has no values.
STATUSES = ("ok", "OOM", "modelled")
# The values a table shows, each with its unit; every one is optional (left out where it does not apply).
VALUE_UNITS = {
    "seconds": "s",  # the timed quantity: median step (train), median batch (precompute), whole run (stream, merge)
    "samples_per_s": "samples/s",  # train: training samples; stream: samples read
    "images_per_s": "images/s",  # images encoded (precompute)
    "peak_rss_mb": "MiB",  # peak resident memory of the row's process during the row
    "peak_mem_mb": "MiB",  # CUDA: torch.cuda.max_memory_allocated during the row
    "peak_reserved_mb": "MiB",  # CUDA: torch.cuda.max_memory_reserved during the row
    "modelled_peak_mb": "MiB",  # modelled rows: the peak of live bytes on the fake GPU
    "modelled_total_mb": "MiB",  # modelled rows: that peak plus the stated margins (extra["margin"])
    "mfu": "fraction of the measured matmul peak",  # train rows (bench.flops.MFU_DEFINITION)
    "ratio": "times the baseline's seconds",  # seconds / baseline["seconds"]
}


@dataclass
class Row:
    row: str  # the kind, one of KINDS
    what: str  # one line: what was timed, on what
    settings: Dict[str, Any]  # every input that shapes the numbers ("device" among them where it is known)
    status: str = "ok"
    label: Optional[str] = None  # a short name for the table (else settings["model"])
    seconds: Optional[float] = None
    samples_per_s: Optional[float] = None
    images_per_s: Optional[float] = None
    peak_rss_mb: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    peak_reserved_mb: Optional[float] = None
    modelled_peak_mb: Optional[float] = None
    modelled_total_mb: Optional[float] = None
    mfu: Optional[float] = None
    ratio: Optional[float] = None
    baseline: Optional[Dict[str, Any]] = None  # the raw comparison, e.g. {"what": "a copy of the file", "seconds": 1.2}
    extra: Dict[str, Any] = field(default_factory=dict)  # kept in the JSON, not shown in the table

    def __post_init__(self):
        problems = []
        if self.row not in KINDS:
            problems.append(f"row {self.row!r} is not one of {', '.join(KINDS)}")
        if not isinstance(self.what, str) or not isinstance(self.settings, dict):
            problems.append("what must be a str and settings a dict")
        if self.status not in STATUSES:
            problems.append(f"status {self.status!r} is not one of {', '.join(STATUSES)}")
        elif (self.status == "modelled") != (self.row == "modelled"):
            # The MODELLED label must never come off a model, nor go on a measurement.
            problems.append(f"a {self.row} row cannot have status {self.status}")
        for name in VALUE_UNITS:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                problems.append(f"{name} must be a number, not {v!r}")
        if self.baseline is not None and not isinstance(self.baseline, dict):
            problems.append("baseline must be a dict")
        if self.label is not None and not isinstance(self.label, str):
            problems.append("label must be a str")
        clash = set(self.extra) & _FIELDS
        if clash:
            problems.append(f"extra holds field names {sorted(clash)}")
        if problems:
            raise DataError(f"bad benchmark row ({'; '.join(problems)}): {self.what!r}"[:300])

    @classmethod
    def of(cls, row: str, what: str, settings: Dict[str, Any], **values) -> "Row":
        """A row from keyword values: those named as fields fill them, the rest go to `extra`."""
        return cls.from_json({"row": row, "what": what, "settings": settings, **values})

    @classmethod
    def from_json(cls, d: Any, source: str = "a benchmark") -> "Row":
        if not isinstance(d, dict) or not all(isinstance(d.get(k), t) for k, t in
                                              (("row", str), ("what", str), ("settings", dict))):
            raise DataError(f"{source} gave a row without the keys row (str), what (str), settings (dict): {d!r}"[:300])
        known = {k: v for k, v in d.items() if k in _FIELDS}
        return cls(**known, extra={k: v for k, v in d.items() if k not in _FIELDS})

    def to_json(self) -> Dict[str, Any]:
        out = {"row": self.row, "what": self.what, "settings": self.settings, "status": self.status}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name not in out and f.name != "extra" and v is not None:
                out[f.name] = v
        return {**out, **self.extra}

    def replace(self, **changes) -> "Row":
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name for f in dataclasses.fields(Row)} - {"extra"}
