"""Data preparation for fine-tuning: read, clean, de-duplicate, split, format, tokenize with loss masks, pack.

Inputs (the kind is decided per record, so one JSONL file may mix them):
  - instruction records  {"instruction": str, "input": str (optional), "output": str}
  - chat records         {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
  - text records         {"text": str} in JSONL, or a plain .txt file split into paragraphs at blank lines
  - choice records       {"instruction" | "question": str, "input": str (optional), "options" | "choices": [str, ...],
                          "answer": index (0-based) | letter ("B") | the option's text}: multiple-choice items; they
                          train as instruction records whose output is the right option, and edgepack.tasks scores
                          them by log-likelihood
A `.json` file holding one array of such objects is read too. Malformed lines are reported with their line number
and reason; every input line ends up either kept or in the report under a named reason (nothing silently skipped).

Cleaning: tags of known HTML elements and comments removed and entities unescaped (`strip_markup`; fields that
hold a markup document or a code fence are left alone, and "<noun>"-style placeholders are content), control and zero-width
characters removed, trailing spaces dropped, runs of spaces inside a line collapsed (leading indentation is kept, so
code survives), 3+ newlines collapsed to one blank line, Alpaca's "<nooutput>" / "<No Input>" markers read as
empty fields. Records left empty (no instruction, output, text or
assistant message) are dropped. De-duplication: exact (sha256 of the lowercased, whitespace-collapsed text), then
near-duplicates: MinHash (64 permutations, deterministic) with LSH banding proposes candidates, and the exact
Jaccard similarity of word 3-shingles >= `near_dup_threshold` confirms them; the first occurrence is kept.
The split is a seeded permutation cut 8:1:1 (train / validation / test), the same for the same input and seed.

Mixing (`prepare_mix`, `tune prepare --mix domain.jsonl:0.7 --mix general.txt:0.3`): every source is read, cleaned,
de-duplicated and split 8:1:1 on its own, exactly as it would be alone (so its held-out records are the same ones,
and no held-out record of one source is trained on through another), and every record keeps the name of its source.
The validation and test splits of the mix are the sources' whole validation and test splits, side by side (each
scored on its own: `split_text(prep, "test", source=name)`). The training split is drawn by weight: weights are
shares of the training tokens (characters when no tokenizer is given), and strategy "under" (default) keeps the
largest mix that repeats nothing (the source that runs out first is taken whole, the others sampled), "over" the
smallest that drops nothing (sources short of their share are repeated). Sampling is a seeded permutation per
source; the drawn records keep their source order. The report lists records and size drawn per source.

Formatting (see `render`): with the tokenizer's chat template when it has one; otherwise the documented template

    ### Instruction:\\n{instruction}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n{output}</s>
    chat: "### System:\\n..\\n\\n", "### User:\\n..\\n\\n", "### Assistant:\\n..\\n\\n" per message, then </s>

Loss is taken only on response tokens (output / assistant messages, and the EOS that ends them): every other label
is -100. Text records train on every token; the paragraphs of a .txt file that fall in one split are re-joined by
blank lines into one stream (the file is one document). Examples are BOS + tokens + EOS, concatenated and cut into blocks of
`seq_len` tokens (sequence packing; attention may cross example boundaries inside a block, as in most packers); the
last block is padded with EOS and label -100.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgepack.artifact import sha256_file
from edgepack.errors import ConfigError
from edgepack.sources import split_weight

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "validation", "test")
MIX_STRATEGIES = ("under", "over")
IGNORE = -100  # label of tokens that carry no loss (PyTorch cross-entropy ignore_index)
# Only tags of known HTML elements are markup: "<noun>" or "<No Input>" in instruction data are content.
_HTML_TAGS = ("a|abbr|b|big|blockquote|body|br|center|cite|code|dd|div|dl|dt|em|font|h[1-6]|head|hr|i|img|li|ol|p|"
              "pre|s|small|span|strike|strong|sub|sup|table|tbody|td|th|thead|title|tr|tt|u|ul")
_TAG = re.compile(rf"<!--.*?-->|</?(?:{_HTML_TAGS})(?:\s[^<>]*)?/?>", re.S | re.I)
# A field holding a markup document or code (an HTML page asked for as the output) keeps its tags.
_MARKUP_DOC = re.compile(r"<!DOCTYPE|<html|<\?xml|```", re.I)
# Alpaca's markers for "this field has no value": the field is treated as empty.
_NO_VALUE = re.compile(r"<\s*no[\s_-]*(input|output)\s*>", re.I)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b-\u200f\u2028\u2029\ufeff]")
_INNER_SPACES = re.compile(r"(?<=\S)[ \t]{2,}")
_BLANKS = re.compile(r"\n{3,}")
_WORD = re.compile(r"\w+")
_MERSENNE = (1 << 31) - 1  # MinHash permutations are (a*x + b) mod this prime; products fit in uint64


@dataclass(frozen=True)
class PrepareConfig:
    seed: int = 0  # seeds the split permutation
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train / validation / test fractions
    strip_markup: bool = True  # remove HTML/XML tags and comments, unescape entities
    near_dup_threshold: float | None = 0.8  # Jaccard of word 3-shingles to call two records duplicates; None: off
    shingle_words: int = 3  # words per shingle for near-duplicate detection
    minhash_perms: int = 64  # MinHash signature length (16 LSH bands of 4 rows)
    # several sources: under = the largest mix that repeats nothing, over = the smallest that drops nothing
    mix_strategy: str = field(default="under", metadata={"choices": MIX_STRATEGIES})

    def validate(self) -> list[str]:
        errs = []
        if len(self.split) != 3 or any(f < 0 for f in self.split) or abs(sum(self.split) - 1) > 1e-6:
            errs.append(f"split must be three non-negative fractions summing to 1, got {self.split}")
        if self.near_dup_threshold is not None and not 0 < self.near_dup_threshold <= 1:
            errs.append("near_dup_threshold must be in (0, 1] or None")
        if self.shingle_words < 1 or self.minhash_perms < 4 or self.minhash_perms % 4:
            errs.append("shingle_words must be >= 1 and minhash_perms a multiple of 4")
        if self.mix_strategy not in MIX_STRATEGIES:
            errs.append(f"mix_strategy must be one of {', '.join(MIX_STRATEGIES)}")
        return errs


@dataclass
class Record:
    kind: str  # "instruction" | "chat" | "text" | "choice"
    data: dict  # instruction: instruction/input/output; chat: messages; text: text; choice: instruction/input/options/answer
    where: str  # "line 12" of the source, for the report
    source: str = ""  # name of the data source in a mix ("" for a single source)

    def content(self) -> str:
        """The record's text in one string (for de-duplication)."""
        if self.kind == "instruction":
            return "\n".join((self.data["instruction"], self.data["input"], self.data["output"]))
        if self.kind == "choice":
            return "\n".join((self.data["instruction"], self.data["input"], *self.data["options"]))
        if self.kind == "chat":
            return "\n".join(f"{m['role']}: {m['content']}" for m in self.data["messages"])
        return self.data["text"]


@dataclass
class Prepared:
    splits: dict[str, list[Record]]
    report: dict = field(default_factory=dict)

    def source_weights(self) -> dict[str, float]:
        """{source name: normalized weight} of a mix; {} for a single source."""
        return {s["name"]: s["share"] for s in self.report.get("sources", [])}

    def of_source(self, split: str, name: str) -> list[Record]:
        return [r for r in self.splits[split] if r.source == name]


# ------------------------------------------------------------------------------------------------------ reading
def _parse_choice(obj: dict, where: str) -> Record | str:
    opts = obj.get("options", obj.get("choices"))
    question = obj.get("instruction", obj.get("question"))
    if not isinstance(question, str):
        return "choice record needs a string 'instruction' (or 'question')"
    if not isinstance(opts, list) or len(opts) < 2 or not all(isinstance(o, str) for o in opts):
        return "'options' must be a list of at least 2 strings"
    if not isinstance(obj.get("input", ""), str):
        return f"'input' must be a string, got {type(obj['input']).__name__}"
    ans = obj.get("answer")
    if isinstance(ans, int) and not isinstance(ans, bool):
        idx = ans if 0 <= ans < len(opts) else None
    elif isinstance(ans, str) and len(ans.strip()) == 1 and ans.strip().isalpha() and ans.strip() not in opts:
        idx = ord(ans.strip().upper()) - ord("A")
        idx = idx if 0 <= idx < len(opts) else None
    elif isinstance(ans, str) and ans in opts:
        idx = opts.index(ans)
    else:
        idx = None
    if idx is None:
        return (f"'answer' must name one of the {len(opts)} options: a 0-based index, a letter or the option's text, "
                f"got {ans!r}")
    return Record("choice", {"instruction": question, "input": obj.get("input", ""), "options": list(opts),
                             "answer": idx}, where)


def _parse_object(obj, where: str) -> Record | str:
    """A Record, or the reason the object is malformed."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if "options" in obj or "choices" in obj:
        return _parse_choice(obj, where)
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f"messages[{i}] must be an object with string 'role' and 'content'"
            if m["role"] not in ROLES:
                return f"messages[{i}] has unknown role '{m['role']}' (expected one of {', '.join(ROLES)})"
        return Record("chat", {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}, where)
    if "instruction" in obj or "output" in obj:
        missing = [k for k in ("instruction", "output") if k not in obj]
        if missing:
            return f"instruction record without '{missing[0]}'"
        bad = [k for k in ("instruction", "input", "output") if k in obj and not isinstance(obj[k], str)]
        if bad:
            return f"'{bad[0]}' must be a string, got {type(obj[bad[0]]).__name__}"
        return Record("instruction", {k: obj.get(k, "") for k in ("instruction", "input", "output")}, where)
    if "text" in obj:
        if not isinstance(obj["text"], str):
            return f"'text' must be a string, got {type(obj['text']).__name__}"
        return Record("text", {"text": obj["text"]}, where)
    return "has none of the keys 'instruction'/'output', 'messages', 'text' or 'options'"


def read_records(path) -> tuple[list[Record], list[dict], dict]:
    """(records, malformed [{"line", "reason"}], counts) of a .jsonl / .json / .txt file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data file '{p}' does not exist", "pass a .jsonl, .json or .txt file")
    raw = p.read_bytes()
    records, malformed, counts = [], [], {"lines": 0, "blank_lines": 0}
    if p.suffix == ".txt":
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[:exc.start].count(b"\n") + 1
            raise ConfigError(f"'{p}' is not UTF-8 text (first bad byte on line {line})", "re-encode it as UTF-8") from None
        lines = text.splitlines()
        counts["lines"] = len(lines)
        start, buf = None, []
        for i, line in enumerate(lines + [""], 1):  # paragraphs: runs of non-blank lines
            if line.strip():
                start = start or i
                buf.append(line)
            else:
                if buf:  # "paragraph": a piece of one continuous document, re-joined by blank lines for training
                    records.append(Record("text", {"text": "\n".join(buf), "paragraph": True}, f"line {start}"))
                counts["blank_lines"] += i <= len(lines)
                start, buf = None, []
        return records, malformed, counts
    if p.suffix == ".json":
        try:
            items = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"'{p}' is not valid JSON ({exc})", "use JSONL (one object per line) or fix the file") from None
        if not isinstance(items, list):
            raise ConfigError(f"'{p}' holds a JSON {type(items).__name__}, not an array of records",
                              "use a JSON array of objects, or JSONL")
        counts["lines"] = len(items)
        for i, obj in enumerate(items):
            rec = _parse_object(obj, f"record {i}")
            (records.append(rec) if isinstance(rec, Record) else malformed.append({"line": f"record {i}", "reason": rec}))
        return records, malformed, counts
    for i, bline in enumerate(raw.split(b"\n"), 1):
        if i == raw.count(b"\n") + 1 and not bline.strip():
            break  # the empty string after the final newline is not a line
        counts["lines"] += 1
        if not bline.strip():
            counts["blank_lines"] += 1
            continue
        try:
            obj = json.loads(bline.decode("utf-8"))
        except UnicodeDecodeError:
            malformed.append({"line": i, "reason": "not UTF-8"})
            continue
        except json.JSONDecodeError as exc:
            malformed.append({"line": i, "reason": f"invalid JSON: {exc.msg} at column {exc.colno}"})
            continue
        rec = _parse_object(obj, f"line {i}")
        (records.append(rec) if isinstance(rec, Record) else malformed.append({"line": i, "reason": rec}))
    return records, malformed, counts


# ----------------------------------------------------------------------------------------------------- cleaning
def clean_text(text: str, strip_markup: bool = True) -> str:
    if strip_markup and not _MARKUP_DOC.search(text):
        text = html.unescape(_TAG.sub("", text))
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text.replace("\xa0", " "))
    text = "\n".join(_INNER_SPACES.sub(" ", line.rstrip()) for line in text.split("\n"))
    text = _BLANKS.sub("\n\n", text).strip("\n").strip()
    return "" if _NO_VALUE.fullmatch(text) else text


def clean_record(rec: Record, strip_markup: bool) -> tuple[Record, str | None]:
    """(cleaned record, reason it is now empty or None)."""
    if rec.kind == "instruction":
        d = {k: clean_text(v, strip_markup) for k, v in rec.data.items()}
        empty = "empty instruction" if not d["instruction"] else "empty output" if not d["output"] else None
    elif rec.kind == "choice":
        d = {"instruction": clean_text(rec.data["instruction"], strip_markup),
             "input": clean_text(rec.data["input"], strip_markup),
             "options": [clean_text(o, strip_markup) for o in rec.data["options"]], "answer": rec.data["answer"]}
        empty = "empty instruction" if not d["instruction"] else "empty option" if not all(d["options"]) else None
    elif rec.kind == "chat":
        msgs = [{"role": m["role"], "content": clean_text(m["content"], strip_markup)} for m in rec.data["messages"]]
        d = {"messages": msgs}
        if not any(m["role"] == "assistant" for m in msgs):
            empty = "no assistant message"
        elif any(not m["content"] for m in msgs):
            empty = "empty message"
        else:
            empty = None
    else:
        d = {**rec.data, "text": clean_text(rec.data["text"], strip_markup)}
        empty = "empty text" if not d["text"] else None
    return Record(rec.kind, d, rec.where, rec.source), empty


# ------------------------------------------------------------------------------------------------ de-duplication
def _shingles(text: str, k: int) -> set[str]:
    words = _WORD.findall(text.lower())
    if len(words) <= k:
        return {" ".join(words)}
    return {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}


def _minhash(shingles: set[str], a, b):
    import numpy as np

    x = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") % _MERSENNE
                  for s in shingles], dtype=np.uint64)
    return ((a[:, None] * x[None, :] + b[:, None]) % _MERSENNE).min(axis=1)


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def deduplicate(records: list[Record], cfg: PrepareConfig) -> tuple[list[Record], list[dict], list[dict]]:
    """(kept, exact duplicates, near duplicates); each dropped entry names the kept record it duplicates."""
    import numpy as np

    seen: dict[str, str] = {}
    kept, exact, near = [], [], []
    for rec in records:
        key = hashlib.sha256(" ".join(rec.content().lower().split()).encode()).hexdigest()
        if key in seen:
            exact.append({"where": rec.where, "duplicate_of": seen[key]})
        else:
            seen[key] = rec.where
            kept.append(rec)
    if cfg.near_dup_threshold is None:
        return kept, exact, near
    rng = np.random.default_rng(1234)  # fixed: the permutations are part of the method, not of the user's seed
    a = rng.integers(1, _MERSENNE, cfg.minhash_perms, dtype=np.uint64)
    b = rng.integers(0, _MERSENNE, cfg.minhash_perms, dtype=np.uint64)
    rows = 4
    buckets: dict[tuple, list[int]] = {}
    out, sh = [], []
    for rec in kept:
        s = _shingles(rec.content(), cfg.shingle_words)
        sig = _minhash(s, a, b)
        cands = set()
        keys = [(band, sig[band * rows:(band + 1) * rows].tobytes()) for band in range(cfg.minhash_perms // rows)]
        for key in keys:
            cands.update(buckets.get(key, ()))
        best = max(((jaccard(s, sh[j]), j) for j in cands), default=(0.0, -1))
        if best[0] >= cfg.near_dup_threshold:
            near.append({"where": rec.where, "duplicate_of": out[best[1]].where, "jaccard": round(best[0], 3)})
            continue
        for key in keys:
            buckets.setdefault(key, []).append(len(out))
        out.append(rec)
        sh.append(s)
    return out, exact, near


# -------------------------------------------------------------------------------------------------------- split
def split_records(records: list[Record], cfg: PrepareConfig) -> dict[str, list[Record]]:
    import numpy as np

    n = len(records)
    if n < 3 and cfg.split[1] > 0 and cfg.split[2] > 0:
        raise ConfigError(f"only {n} record(s) left after cleaning and de-duplication; a train/validation/test split "
                          "needs at least 3", "add data, or see the report for what was dropped")
    n_val = max(1, round(n * cfg.split[1])) if cfg.split[1] > 0 else 0
    n_test = max(1, round(n * cfg.split[2])) if cfg.split[2] > 0 else 0
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_train = n - n_val - n_test
    cuts = {"train": order[:n_train], "validation": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {name: [records[i] for i in sorted(idx)] for name, idx in cuts.items()}  # keep source order in a split


def prepare(path, cfg: PrepareConfig = PrepareConfig()) -> Prepared:
    """Read, clean, de-duplicate and split a data file; the report accounts for every input line."""
    records, malformed, counts = read_records(path)
    cleaned, empty, changed = [], [], 0
    for rec in records:
        new, why = clean_record(rec, cfg.strip_markup)
        changed += new.data != rec.data
        (empty.append({"where": rec.where, "reason": why}) if why else cleaned.append(new))
    kept, exact, near = deduplicate(cleaned, cfg)
    if not kept:
        raise ConfigError(f"no usable records in '{path}' ({len(malformed)} malformed, {len(empty)} empty, "
                          f"{len(exact) + len(near)} duplicates)",
                          "check the format: JSONL with instruction/output, messages or text, or a .txt file")
    splits = split_records(kept, cfg)
    kinds: dict[str, int] = {}
    for rec in kept:
        kinds[rec.kind] = kinds.get(rec.kind, 0) + 1
    report = {
        "source": str(path), "source_sha256": sha256_file(Path(path)),
        "config": asdict(cfg), **counts, "records_read": len(records), "records_kept": len(kept), "kinds": kinds,
        "records_changed_by_cleaning": changed,
        "dropped": {"malformed": malformed, "empty": empty, "exact_duplicate": exact, "near_duplicate": near},
        "dropped_counts": {"malformed": len(malformed), "empty": len(empty), "exact_duplicate": len(exact),
                           "near_duplicate": len(near)},
        "splits": {k: len(v) for k, v in splits.items()},
    }
    return Prepared(splits, report)


# ------------------------------------------------------------------------------------------------------- mixing
@dataclass(frozen=True)
class Source:
    path: str
    weight: float  # as given; shares are weight / sum of weights
    name: str  # the file's stem, made unique: names the source in records, reports and metrics


def parse_sources(data) -> list[Source]:
    """The sources of a `data` setting: one path, or a list of "path:weight" strings (one path alone needs no
    weight)."""
    items = [data] if isinstance(data, (str, Path)) else list(data)
    if not items:
        raise ConfigError("no data source given", "pass a data file, or several as PATH:WEIGHT (--mix a.jsonl:0.7)")
    out, names = [], set()
    for item in items:
        path, weight = split_weight(str(item))
        if weight is None:
            if len(items) > 1:
                raise ConfigError(f"data source '{item}' of a mix has no weight",
                                  "write each source of a mix as PATH:WEIGHT, e.g. domain.jsonl:0.7 general.txt:0.3")
            weight = 1.0
        if not (weight > 0 and weight != float("inf")):
            raise ConfigError(f"data source '{item}' has weight {weight:g}", "weights must be positive numbers")
        name, k = Path(path).stem or "data", 2
        while name in names:
            name, k = f"{Path(path).stem}-{k}", k + 1
        names.add(name)
        out.append(Source(path, float(weight), name))
    return out


def _record_size(rec: Record, tokenizer) -> int:
    """Tokens of a record as trained (BOS/EOS included; paragraphs of a .txt join a stream), or its characters."""
    text = "".join(s for s, _ in render(rec, tokenizer or _NoTemplate()))
    if tokenizer is None:
        return len(text)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + (1 if rec.data.get("paragraph") else 2)


def _draw(sizes: list[int], budget: float, rng) -> tuple[list[int], int]:
    """(indices, whole copies): whole copies of the source while the budget covers one, then a seeded random subset
    (taken until its size reaches the rest of the budget), in source order."""
    import numpy as np

    total = sum(sizes)
    copies = int(budget / total + 1e-9)
    rest = budget - copies * total
    idx = list(range(len(sizes))) * copies
    if rest > 1e-9 * total:
        perm = rng.permutation(len(sizes))
        cum = np.cumsum(np.asarray(sizes, dtype=np.float64)[perm])
        k = min(len(sizes), int(np.searchsorted(cum, rest - 1e-9, side="left")) + 1)
        idx += sorted(int(i) for i in perm[:k])
    return idx, copies


def prepare_mix(sources: list[Source], cfg: PrepareConfig = PrepareConfig(), tokenizer=None) -> Prepared:
    """Prepare every source on its own (clean, de-duplicate, split), then draw the training split by weight (see the
    module docstring). With `tokenizer` the weights are shares of training tokens, else of characters."""
    import numpy as np

    for src in sources:
        if Path(src.path).is_dir():
            raise ConfigError(f"a mix reads data files; '{src.path}' is a folder",
                              "mix the raw files (each is cleaned and split on its own)")
    parts = [(src, prepare(src.path, cfg)) for src in sources]
    unit = "tokens" if tokenizer is not None else "characters"
    total_w = sum(s.weight for s in sources)
    sizes = [[_record_size(r, tokenizer) for r in p.splits["train"]] for _, p in parts]
    for (src, _), sz in zip(parts, sizes):
        if not sum(sz):
            raise ConfigError(f"data source '{src.path}' has an empty training split", "give it more records")
    ratios = [sum(sz) / (s.weight / total_w) for s, sz in zip(sources, sizes)]
    mix_total = min(ratios) if cfg.mix_strategy == "under" else max(ratios)
    splits: dict[str, list[Record]] = {name: [] for name in SPLITS}
    rows, dropped, kinds = [], {}, {}
    drawn_sizes = []
    for i, ((src, prep), sz) in enumerate(zip(parts, sizes)):
        share = src.weight / total_w
        idx, copies = _draw(sz, share * mix_total, np.random.default_rng((cfg.seed, 104_729, i)))
        train = prep.splits["train"]
        splits["train"] += [Record(train[j].kind, train[j].data, train[j].where, src.name) for j in idx]
        for name in ("validation", "test"):
            splits[name] += [Record(r.kind, r.data, r.where, src.name) for r in prep.splits[name]]
        drawn_sizes.append(sum(sz[j] for j in idx))
        r = prep.report
        for reason, items in r["dropped"].items():
            dropped.setdefault(reason, []).extend({"source": src.name, **d} for d in items)
        for k, v in r["kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
        rows.append({"name": src.name, "path": str(src.path), "sha256": r["source_sha256"], "weight": src.weight,
                     "share": round(share, 6), "lines": r["lines"], "records_read": r["records_read"],
                     "records_kept": r["records_kept"], "kinds": r["kinds"], "dropped_counts": r["dropped_counts"],
                     "splits": r["splits"], "train_size": sum(sz),
                     "drawn": {"records": len(idx), "distinct_records": len(set(idx)), "whole_copies": copies,
                               "size": drawn_sizes[-1]}})
    for row, size in zip(rows, drawn_sizes):
        row["drawn"]["share"] = round(size / max(1, sum(drawn_sizes)), 4)
    reports = [p.report for _, p in parts]
    report = {
        "sources": rows, "mix": {"strategy": cfg.mix_strategy, "unit": unit, "seed": cfg.seed,
                                 "train_size": sum(drawn_sizes)},
        "config": asdict(cfg), "lines": sum(r["lines"] for r in reports),
        "blank_lines": sum(r["blank_lines"] for r in reports), "records_read": sum(r["records_read"] for r in reports),
        "records_kept": sum(r["records_kept"] for r in reports), "kinds": kinds,
        "records_changed_by_cleaning": sum(r["records_changed_by_cleaning"] for r in reports),
        "dropped": {k: dropped.get(k, []) for k in reports[0]["dropped"]},
        "dropped_counts": {k: len(dropped.get(k, [])) for k in reports[0]["dropped"]},
        "splits": {k: len(v) for k, v in splits.items()},
    }
    return Prepared(splits, report)


def write_prepared(prep: Prepared, out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, recs in prep.splits.items():
        with open(out / f"{name}.jsonl", "w") as f:
            for r in recs:
                head = {"kind": r.kind, "where": r.where, **({"source": r.source} if r.source else {})}
                f.write(json.dumps({**head, **r.data}, ensure_ascii=False) + "\n")
    (out / "report.json").write_text(json.dumps(prep.report, indent=2, ensure_ascii=False) + "\n")


def load_prepared(folder: Path) -> Prepared:
    """A directory written by write_prepared (`edgepack tune prepare`)."""
    folder = Path(folder)
    splits = {}
    for name in SPLITS:
        p = folder / f"{name}.jsonl"
        if not p.is_file():
            raise ConfigError(f"'{folder}' has no {name}.jsonl", "pass a data file, or a folder written by 'edgepack tune prepare'")
        recs = []
        for line in p.read_text().splitlines():
            d = json.loads(line)
            kind, where, source = d.pop("kind"), d.pop("where", "?"), d.pop("source", "")
            recs.append(Record(kind, d, where, source))
        splits[name] = recs
    report = json.loads((folder / "report.json").read_text()) if (folder / "report.json").is_file() else {}
    return Prepared(splits, report)


def load_or_prepare(data, cfg: PrepareConfig = PrepareConfig(), tokenizer=None) -> Prepared:
    """A `tune prepare` folder, one data file, or a mix of "path:weight" sources (see prepare_mix)."""
    sources = parse_sources(data)
    if len(sources) > 1:
        return prepare_mix(sources, cfg, tokenizer)
    path = Path(sources[0].path)
    return load_prepared(path) if path.is_dir() else prepare(path, cfg)


# --------------------------------------------------------------------------------------------------- formatting
def _output(rec: Record) -> str:
    """The trained response of an instruction or choice record (a choice record's right option)."""
    return rec.data["options"][rec.data["answer"]] if rec.kind == "choice" else rec.data["output"]


def _to_messages(rec: Record) -> list[dict]:
    if rec.kind == "chat":
        return rec.data["messages"]
    d = rec.data
    user = d["instruction"] + ("\n\n" + d["input"] if d["input"] else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": _output(rec)}]


def render(rec: Record, tokenizer) -> list[tuple[str, bool]]:
    """The record as text segments (text, trains?) before tokenization; see the module docstring for templates."""
    if rec.kind == "text":
        return [(rec.data["text"], True)]
    if getattr(tokenizer, "chat_template", None):
        return _render_chat_template(_to_messages(rec), tokenizer)
    if rec.kind in ("instruction", "choice"):
        d = rec.data
        prompt = f"### Instruction:\n{d['instruction']}\n\n" + (f"### Input:\n{d['input']}\n\n" if d["input"] else "")
        return [(prompt + "### Response:\n", False), (_output(rec), True)]
    segs = []
    for m in rec.data["messages"]:
        head = f"### {m['role'].capitalize()}:\n"
        segs += [(head, False), (m["content"], m["role"] == "assistant"), ("\n\n", False)]
    return segs[:-1]


def _render_chat_template(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    def apply(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    segs, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = apply(messages[:i], True), apply(messages[:i + 1], False)
        if not before.startswith(done) or not upto.startswith(before):
            raise ConfigError("the tokenizer's chat template does not render conversations incrementally (a prefix "
                              "changes when a turn is added), so response tokens cannot be located",
                              "fix the chat template, or remove it to use edgepack's documented default template")
        segs += [(before[len(done):], False), (upto[len(before):], True)]
        done = upto
    final = apply(messages, False)
    if final.startswith(done) and len(final) > len(done):
        segs.append((final[len(done):], False))
    return [s for s in segs if s[0]]


def prompt_and_reference(rec: Record, tokenizer) -> tuple[str, str]:
    """(prompt text, reference response) of an instruction, chat or choice record, formatted as `render` trains it:
    everything before the last response is the prompt (for a chat, the last assistant message is the reference)."""
    if rec.kind == "text":
        raise ConfigError("a text record has no prompt and response", "use instruction, chat or choice records")
    segs = render(rec, tokenizer)
    last = max(i for i, (_, trains) in enumerate(segs) if trains)
    return "".join(s for s, _ in segs[:last]), segs[last][0]


def encode(rec: Record, tokenizer) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example: BOS + tokens + EOS, labels IGNORE outside response tokens."""
    segs = render(rec, tokenizer)
    text = "".join(s for s, _ in segs)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans, pos = [], 0
        for s, trains in segs:
            if trains:
                spans.append((pos, pos + len(s)))
            pos += len(s)
        ids = list(enc["input_ids"])
        labels = [t if any(a <= start < b for a, b in spans) else IGNORE
                  for t, (start, _end) in zip(ids, enc["offset_mapping"])]
    else:  # slow tokenizers have no offsets: tokenize segment by segment (boundary tokens may differ slightly)
        ids, labels = [], []
        for s, trains in segs:
            part = tokenizer(s, add_special_tokens=False)["input_ids"]
            ids += part
            labels += part if trains else [IGNORE] * len(part)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and not (ids and ids[0] == bos):
        ids, labels = [bos] + ids, [IGNORE] + labels
    if eos is not None and not (ids and ids[-1] == eos):
        ids, labels = ids + [eos], labels + [eos if segs[-1][1] else IGNORE]
    return ids, labels


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Concatenate examples and cut into blocks of seq_len tokens; the tail block is padded with label IGNORE."""
    ids = [t for e in examples for t in e[0]]
    labels = [t for e in examples for t in e[1]]
    blocks_ids, blocks_labels = [], []
    for i in range(0, len(ids), seq_len):
        chunk, lab = ids[i:i + seq_len], labels[i:i + seq_len]
        pad = seq_len - len(chunk)
        blocks_ids.append(chunk + [pad_id] * pad)
        blocks_labels.append(lab + [IGNORE] * pad)
    return blocks_ids, blocks_labels


def tokenize_splits(prep: Prepared, tokenizer, seq_len: int) -> tuple[dict, dict]:
    """({split: (input_ids [N, seq_len] int64 tensor, labels tensor)}, token statistics per split)."""
    import torch

    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    out, stats = {}, {}
    for name, recs in prep.splits.items():
        examples = [encode(r, tokenizer) for r in _join_paragraphs(recs)]
        ids, labels = pack(examples, seq_len, pad) if examples else ([], [])
        n_tok = sum(len(e[0]) for e in examples)
        n_train = sum(sum(1 for t in e[1] if t != IGNORE) for e in examples)
        stats[name] = {"examples": len(examples), "tokens": n_tok, "loss_tokens": n_train, "blocks": len(ids),
                       "longer_than_seq_len": sum(len(e[0]) > seq_len for e in examples)}
        if any(r.source for r in recs):
            by: dict[str, dict] = {}
            for r, e in zip(_join_paragraphs(recs), examples):
                st = by.setdefault(r.source, {"records": 0, "tokens": 0, "loss_tokens": 0})
                st["tokens"] += len(e[0])
                st["loss_tokens"] += sum(1 for t in e[1] if t != IGNORE)
            for r in recs:
                by.setdefault(r.source, {"records": 0, "tokens": 0, "loss_tokens": 0})["records"] += 1
            stats[name]["by_source"] = by
        out[name] = (torch.tensor(ids, dtype=torch.long).reshape(-1, seq_len),
                     torch.tensor(labels, dtype=torch.long).reshape(-1, seq_len))
    return out, stats


def _join_paragraphs(recs: list[Record]) -> list[Record]:
    """Runs of consecutive .txt paragraphs become one text record joined by blank lines: a plain-text file is one
    document, so it trains as the continuous stream it is read as (and as edgepack-ppl-v1 scores it), not as
    BOS/EOS-wrapped fragments whose starts tokenize differently."""
    out: list[Record] = []
    for r in recs:
        if (r.kind == "text" and r.data.get("paragraph") and out and out[-1].data.get("paragraph")
                and out[-1].source == r.source):
            out[-1] = Record("text", {"text": out[-1].data["text"] + "\n\n" + r.data["text"], "paragraph": True},
                             out[-1].where, r.source)
        else:
            out.append(r)
    return out


def tokenize_sources(prep: Prepared, tokenizer, seq_len: int, splits=("validation", "test")) -> dict:
    """{source: {split: (input_ids, labels)}}: the held-out splits of a mix packed per source, so each source is
    scored on its own ({} for a single source)."""
    out = {}
    for name in prep.source_weights():
        part = Prepared({s: prep.of_source(s, name) for s in splits})
        out[name] = tokenize_splits(part, tokenizer, seq_len)[0]
    return out


def split_text(prep: Prepared, split: str, source: str | None = None) -> str:
    """A split's records as one text (rendered prompts + responses, joined by blank lines), for perplexity; with
    `source`, only that source's records (of a mix)."""
    return _as_text(prep.splits[split] if source is None else prep.of_source(split, source))


def _as_text(recs: list[Record]) -> str:
    return "\n\n".join("".join(s for s, _ in render(r, _NoTemplate())) for r in recs)


class _NoTemplate:
    chat_template = None


def records_text(path) -> str:
    """A .jsonl / .json file of records (a `tune prepare` split file included) as the one text perplexity scores: the
    records rendered as `tune` trains them without a chat template, joined by blank lines (so a .txt's paragraphs
    read as the stream they came from). A malformed line or a file with no records is refused, never scored raw."""
    records, malformed, _ = read_records(path)
    if malformed:
        m = malformed[0]
        raise ConfigError(f"'{path}' is read as records (JSONL), and line {m['line']} is not one: {m['reason']}"
                          + (f" (and {len(malformed) - 1} more)" if len(malformed) > 1 else ""),
                          "fix the file, or pass plain text as a .txt file")
    if not records:
        raise ConfigError(f"'{path}' holds no records", "pass a JSONL file of text / instruction / chat records, or a .txt")
    return _as_text(records)
