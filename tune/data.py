"""Data preparation for fine-tuning: read, clean, de-duplicate, split, format, tokenize with loss masks, pack.

Inputs (the kind is decided per record, so one JSONL file may mix them):
  - instruction records  {"instruction": str, "input": str (optional), "output": str}
  - chat records         {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
  - text records         {"text": str} in JSONL, or a plain .txt file split into paragraphs at blank lines
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

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "validation", "test")
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

    def validate(self) -> list[str]:
        errs = []
        if len(self.split) != 3 or any(f < 0 for f in self.split) or abs(sum(self.split) - 1) > 1e-6:
            errs.append(f"split must be three non-negative fractions summing to 1, got {self.split}")
        if self.near_dup_threshold is not None and not 0 < self.near_dup_threshold <= 1:
            errs.append("near_dup_threshold must be in (0, 1] or None")
        if self.shingle_words < 1 or self.minhash_perms < 4 or self.minhash_perms % 4:
            errs.append("shingle_words must be >= 1 and minhash_perms a multiple of 4")
        return errs


@dataclass
class Record:
    kind: str  # "instruction" | "chat" | "text"
    data: dict  # instruction: instruction/input/output; chat: messages; text: text
    where: str  # "line 12" of the source, for the report

    def content(self) -> str:
        """The record's text in one string (for de-duplication)."""
        if self.kind == "instruction":
            return "\n".join((self.data["instruction"], self.data["input"], self.data["output"]))
        if self.kind == "chat":
            return "\n".join(f"{m['role']}: {m['content']}" for m in self.data["messages"])
        return self.data["text"]


@dataclass
class Prepared:
    splits: dict[str, list[Record]]
    report: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------ reading
def _parse_object(obj, where: str) -> Record | str:
    """A Record, or the reason the object is malformed."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
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
    return "has none of the keys 'instruction'/'output', 'messages' or 'text'"


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
    return Record(rec.kind, d, rec.where), empty


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


def write_prepared(prep: Prepared, out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, recs in prep.splits.items():
        with open(out / f"{name}.jsonl", "w") as f:
            for r in recs:
                f.write(json.dumps({"kind": r.kind, "where": r.where, **r.data}, ensure_ascii=False) + "\n")
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
            recs.append(Record(d.pop("kind"), {k: v for k, v in d.items() if k != "where"}, d.get("where", "?")))
        splits[name] = recs
    report = json.loads((folder / "report.json").read_text()) if (folder / "report.json").is_file() else {}
    return Prepared(splits, report)


def load_or_prepare(data, cfg: PrepareConfig = PrepareConfig()) -> Prepared:
    return load_prepared(Path(data)) if Path(data).is_dir() else prepare(data, cfg)


# --------------------------------------------------------------------------------------------------- formatting
def _to_messages(rec: Record) -> list[dict]:
    if rec.kind == "chat":
        return rec.data["messages"]
    d = rec.data
    user = d["instruction"] + ("\n\n" + d["input"] if d["input"] else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": d["output"]}]


def render(rec: Record, tokenizer) -> list[tuple[str, bool]]:
    """The record as text segments (text, trains?) before tokenization; see the module docstring for templates."""
    if rec.kind == "text":
        return [(rec.data["text"], True)]
    if getattr(tokenizer, "chat_template", None):
        return _render_chat_template(_to_messages(rec), tokenizer)
    if rec.kind == "instruction":
        d = rec.data
        prompt = f"### Instruction:\n{d['instruction']}\n\n" + (f"### Input:\n{d['input']}\n\n" if d["input"] else "")
        return [(prompt + "### Response:\n", False), (d["output"], True)]
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
        out[name] = (torch.tensor(ids, dtype=torch.long).reshape(-1, seq_len),
                     torch.tensor(labels, dtype=torch.long).reshape(-1, seq_len))
    return out, stats


def _join_paragraphs(recs: list[Record]) -> list[Record]:
    """Runs of consecutive .txt paragraphs become one text record joined by blank lines: a plain-text file is one
    document, so it trains as the continuous stream it is read as (and as edgepack-ppl-v1 scores it), not as
    BOS/EOS-wrapped fragments whose starts tokenize differently."""
    out: list[Record] = []
    for r in recs:
        if r.kind == "text" and r.data.get("paragraph") and out and out[-1].data.get("paragraph"):
            out[-1] = Record("text", {"text": out[-1].data["text"] + "\n\n" + r.data["text"], "paragraph": True},
                             out[-1].where)
        else:
            out.append(r)
    return out


def split_text(prep: Prepared, split: str) -> str:
    """A split's records as one text (rendered prompts + responses, joined by blank lines), for perplexity."""
    return "\n\n".join("".join(s for s, _ in render(r, _NoTemplate())) for r in prep.splits[split])


class _NoTemplate:
    chat_template = None
