"""Where ctvlp may write and delete: the results folder, case ids as path components, atomic
per-case folders.

Every path that ctvlp builds from data (a case id from a user's table) or deletes goes through
this module, so that hostile or careless input cannot reach outside the results folder:

- ``case_id_problem(case_id)`` says why an id cannot be a folder name (separators, ``.``/``..``,
  a leading ``-``, control or invisible characters, over-long names, names that Windows or a
  case-insensitive filesystem would treat specially); ``case_folders(ids, policy)`` turns the
  ids of a cohort into folder names: unsafe ids are excluded with that reason, or, under policy
  ``slug``, mapped to a recorded safe name; two ids that would share a folder (also only by
  letter case) are both excluded, never merged.
- ``prepare_results(path, ...)`` refuses a results folder that is ``/``, empty, the checkout or
  one of its parents, or a non-empty folder that ctvlp did not create, and marks ctvlp's own
  results folder with ``MARKER``.
- ``replace_dir`` / ``remove_tree`` delete only inside a marked results folder; per-case outputs
  are written into a temporary sibling and renamed into place, so a case folder exists only when
  complete.
- ``atomic_write(path, writer)`` is the one way a file that must appear complete is written
  (tables, the model's weights and checkpoints, bundle.json, config snapshots): through a
  temporary file beside it, fsynced, renamed over ``path``, and the folder fsynced.
- ``read_parquet(path)`` reads one of the workflow's own tables; a missing or damaged one fails
  naming the file and the rule that writes it (``snakemake --forcerun RULE`` repairs the run).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

MARKER = ".ctvlp-results"
MARKER_TEXT = "This folder holds ctvlp outputs; ctvlp may replace and delete files inside it.\n"
MAX_ID_LENGTH = 128
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# device names Windows reserves in every folder (also with an extension): a share mounted there breaks
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
ID_POLICIES = ("exclude", "slug")


class UnsafePathError(ValueError):
    """A path that ctvlp was asked to write or delete lies outside its results folder."""


class UnsafeCaseIdError(ValueError):
    """A case id that cannot be used as a folder name."""


# ---- case ids --------------------------------------------------------------------------------


def case_id_problem(case_id: str) -> str | None:
    """Why ``case_id`` cannot name a folder, or None when it is a plain name.

    A plain name is 1-128 characters of ASCII letters, digits, ``.``, ``_`` and ``-``, starting
    with a letter or digit, not ending with ``.``, and not a Windows device name.
    """
    if not isinstance(case_id, str) or not case_id:
        return "empty case id"
    shown = ascii(case_id)[1:-1]
    if len(case_id) > MAX_ID_LENGTH:
        return f"case id longer than {MAX_ID_LENGTH} characters ({len(case_id)})"
    if case_id in (".", ".."):
        return f"case id {shown!r} names a folder itself"
    if "/" in case_id or "\\" in case_id:
        return f"case id {shown!r} holds a path separator"
    bad = [c for c in case_id if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    if bad:
        return f"case id {shown!r} holds control or invisible characters"
    if case_id.startswith("-"):
        return f"case id {shown!r} starts with '-' (read as a command-line option)"
    if not SAFE_ID.fullmatch(case_id):
        return f"case id {shown!r} holds characters other than letters, digits, '.', '_' and '-'"
    if case_id.endswith("."):
        return f"case id {shown!r} ends with '.'"
    if case_id.split(".")[0].lower() in _WINDOWS_RESERVED:
        return f"case id {shown!r} is a reserved device name on Windows"
    return None


def check_case_id(case_id: str) -> str:
    """``case_id`` itself, or ``UnsafeCaseIdError`` with the reason (for ids given by hand)."""
    problem = case_id_problem(case_id)
    if problem:
        raise UnsafeCaseIdError(problem)
    return case_id


def slug(case_id: str) -> str:
    """A plain folder name for an unsafe id: its safe characters plus a digest of the whole id,
    so that different ids get different names."""
    text = unicodedata.normalize("NFKD", str(case_id)).encode("ascii", "ignore").decode()
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:96] or "case"
    if base.split(".")[0].lower() in _WINDOWS_RESERVED:
        base = f"case_{base}"
    return f"{base}-{hashlib.sha256(str(case_id).encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


def case_folders(case_ids: Iterable[str], policy: str = "exclude") -> tuple[dict[str, str], dict[str, str]]:
    """Folder names for a cohort's ids: ``({id: folder}, {id: reason excluded})``.

    policy "exclude": an unsafe id is excluded with its reason. policy "slug": it gets
    ``slug(id)`` (the caller records the mapping). Ids whose folders coincide, also only by
    letter case (a case-insensitive filesystem would merge them), are all excluded.
    """
    if policy not in ID_POLICIES:
        raise ValueError(f"case id policy must be one of {ID_POLICIES}, not {policy!r}")
    folders, excluded = {}, {}
    for cid in case_ids:
        problem = case_id_problem(cid)
        if problem is None:
            folders[cid] = cid
        elif policy == "slug":
            folders[cid] = slug(cid)
        else:
            excluded[cid] = f"{problem}; unsafe as a folder name (set cohort.unsafe_ids: slug to map it)"
    by_key: dict[str, list[str]] = {}
    for cid, folder in folders.items():
        by_key.setdefault(folder.casefold(), []).append(cid)
    for group in by_key.values():
        if len(group) > 1:
            names = ", ".join(ascii(c) for c in sorted(group))
            for cid in group:
                excluded[cid] = f"case ids {names} would share one folder (letter case ignored); none is used"
                folders.pop(cid)
    return folders, excluded


# ---- the results folder ----------------------------------------------------------------------


def _resolved(path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()


def is_inside(path, root) -> bool:
    """True when ``path`` (resolved, links followed) lies strictly inside ``root``."""
    p, r = _resolved(path), _resolved(root)
    return p != r and r in p.parents


def find_results_root(path) -> Path | None:
    """The nearest folder at or above ``path`` that holds ``MARKER``."""
    p = _resolved(path)
    for folder in (p, *p.parents):
        if (folder / MARKER).is_file():
            return folder
    return None


def results_problem(path, protected: Iterable = (), force: bool = False) -> str | None:
    """Why ``path`` cannot be ctvlp's results folder, or None.

    Refused: an empty path, ``/``, a folder that holds one of ``protected`` (the checkout, the
    working directory) or is one of them, and - unless ``force`` - an existing non-empty folder
    without ``MARKER``.
    """
    if path is None or not str(path).strip():
        return "results is empty; name a folder for ctvlp's outputs (default: results)"
    p = _resolved(path)
    if p == Path(p.anchor):
        return f"results {str(path)!r} is the filesystem root"
    for keep in protected:
        k = _resolved(keep)
        if p == k or p in k.parents:
            return f"results {str(path)!r} ({p}) is or holds {k}, whose files ctvlp must not replace"
    if force or not p.exists():
        return None
    if not p.is_dir():
        return f"results {str(path)!r} is a file, not a folder"
    if (p / MARKER).is_file() or not any(p.iterdir()):
        return None
    return (f"results {str(path)!r} ({p}) is a non-empty folder that ctvlp did not create (no {MARKER} in it); "
            "ctvlp replaces and deletes files in its results folder. Choose a new or empty folder, or set "
            "results_force: true to adopt this one")


def prepare_results(path, protected: Iterable = (), force: bool = False, create: bool = True) -> Path:
    """Check ``path`` with ``results_problem`` (ValueError with the reason); with ``create``
    make the folder and mark it as ctvlp's. Returns the resolved folder."""
    problem = results_problem(path, protected, force)
    if problem:
        raise UnsafePathError(problem)
    p = _resolved(path)
    if create:
        p.mkdir(parents=True, exist_ok=True)
        marker = p / MARKER
        if not marker.is_file():
            marker.write_text(MARKER_TEXT, encoding="utf-8")
    return p


# ---- deleting and replacing ------------------------------------------------------------------


def _deletable(path) -> Path:
    """``path`` resolved, or UnsafePathError unless it lies strictly inside a marked results
    folder (links are resolved first, so a link cannot lead a deletion outside)."""
    root = find_results_root(Path(path).parent)
    if root is None or not is_inside(path, root):
        raise UnsafePathError(f"refusing to delete {path}: it is not inside a ctvlp results folder "
                              f"(a folder holding {MARKER})")
    return _resolved(path)


def remove_tree(path) -> None:
    """Delete a file or folder that lies inside a marked results folder (no-op when absent)."""
    if not os.path.lexists(path):
        return
    target = _deletable(path)
    if Path(path).is_symlink() or target.is_file():
        Path(path).unlink()
    else:
        shutil.rmtree(target)


@contextlib.contextmanager
def replace_dir(final) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; when the block ends without error it
    replaces ``final`` in one rename, so ``final`` is always either the old or the complete new
    content. On error the temporary folder is removed and ``final`` is left as it was.

    ``final`` must lie inside a marked results folder whenever something has to be deleted (an
    old ``final``, leftovers of a killed run); a new folder elsewhere is allowed (a by-hand run).
    """
    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{final.name}.tmp-*"):  # a run killed mid-write
        remove_tree(stale)
    tmp = parent / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours, made above
        raise
    old = None
    if os.path.lexists(final):
        _deletable(final)
        old = parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # the checked old content, renamed by us


def fsync_dir(folder) -> None:
    """Make the entries of ``folder`` (a rename into it) durable; a no-op where folders cannot be
    opened (Windows) or synced."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path, writer: Callable[[Path], object]) -> Path:
    """Write ``path`` complete or not at all: ``writer(tmp)`` writes a temporary file beside it
    (``.<name>.<random>.tmp``, unique also between threads, same folder, so the rename stays on one
    file system); the file is fsynced, renamed over ``path`` and the folder fsynced, so after a
    crash or a kill readers see the old file or the complete new one. The temporary file is removed
    when anything fails. The folder must exist (a missing one is an error, not created here)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        writer(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def write_text_atomic(path, text: str) -> Path:
    """``atomic_write`` of UTF-8 ``text``."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_parquet_atomic(table, path) -> Path:
    """``atomic_write`` of the polars ``table`` as Parquet (its folder made first): readers never see
    a half-written table."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, table.write_parquet)


# ---- reading the workflow's own tables -------------------------------------------------------

# The rule that writes each of the workflow's Parquet tables, by the end of its path (PurePath.match).
PARQUET_WRITERS = (
    ("cohort/manifest.parquet", "cohort"), ("cohort/ground_truth.parquet", "cohort"),
    ("cohort/exclusions.parquet", "cohort"),
    ("shards/segment/*.parquet", "segment"), ("segment/*/anatomies.parquet", "segment"),
    ("shards/preprocessed/*.parquet", "preprocess"),
    ("qc/cases.parquet", "qc"), ("qc/qc.parquet", "qc"), ("qc/excluded.parquet", "qc"),
    ("reports/reports.parquet", "reports"),
    ("*/linear_probe_predictions.parquet", "linear_probe"), ("*/linear_probe.parquet", "linear_probe"),
    ("*/predictions.parquet", "evaluate_zeroshot"), ("*/zeroshot.parquet", "evaluate_zeroshot"),
)


class UnreadableTableError(ValueError):
    """One of the workflow's own tables is missing, truncated or otherwise unreadable."""


def table_writer(path) -> str | None:
    """The workflow rule that writes the Parquet table ``path`` (``PARQUET_WRITERS``), or None."""
    p = Path(path)
    return next((rule for pattern, rule in PARQUET_WRITERS if p.match(pattern)), None)


def read_parquet(path, columns: list[str] | None = None):
    """The workflow's own Parquet table ``path`` (the manifest, qc's case table, the reports, ground
    truth, shard tables, predictions) as a polars DataFrame.

    A missing, truncated or damaged file raises ``UnreadableTableError`` naming the file, the rule
    that writes it, and the command that repairs the run: a damaged output is newer than its
    inputs, so a plain rerun would not write it again, and every later stage would fail on it.
    """
    import polars as pl  # here: the rest of this module is imported by light tools too

    rule = table_writer(path)
    if rule:
        repair = (f"It is written by the workflow's rule '{rule}'. Run `snakemake --forcerun {rule}` (plus your "
                  "usual options) to write it again; the stages after it rerun too")
    else:
        repair = "Write it again with the stage that made it"
    if not Path(path).is_file():
        raise UnreadableTableError(f"table not found: {path}. {repair}")
    try:
        return pl.read_parquet(path, columns=columns)
    except Exception as e:  # noqa: BLE001 - polars raises several kinds for a damaged file
        reason = " ".join(str(e).split())[:300]
        raise UnreadableTableError(f"cannot read the table {path} (truncated or damaged? {type(e).__name__}: "
                                   f"{reason}). {repair}") from None
