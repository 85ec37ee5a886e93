"""Recipes are TOML data; running one is a loop.

    [recipe]
    name = "small"
    model = "../shared/models/stories260K"   # HF checkpoint dir or artifact; "embedded:stories260K"; or a hub id
    targets = ["cpu-x86-64"]                 # names or paths to target TOMLs
    workdir = "runs/small"                   # optional; default ./edgepack-runs/<name>

    [[stages]]
    kind = "convert"
    dtype = "float16"

    [[stages]]
    kind = "eval"
    text = "../shared/data/tinystories-valid-sample.txt"

A target-specific stage may override its settings for one target (a table under the stage, keyed by target name):

    [[stages]]
    kind = "quantize"
    method = "auto"                          # fp8 where the GPU has it, else int4-gptq, else int8
    [stages.per_target.jetson-orin-nano-8gb]
    method = "int8"

`skip = "why"` in such a table leaves the stage out for that target (the artifact passes on unchanged); run.json
records the step as "skipped" with the reason, so a report can say why a target has no such stage.

Relative paths resolve against the recipe file's folder. Each stage's output directory is named by a hash of
(input artifact digest, stage kind and version, config with file contents hashed, target profile), so an
interrupted run resumes where it stopped and a repeated run does no work. Stages before the first per-target
stage run once; from there the plan fans out, one branch per target.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tomllib

from edgepack.artifact import MANIFEST_NAME, Artifact, open_artifact, sha256_file
from edgepack.config import build_config, path_fields
from edgepack.errors import ConfigError, did_you_mean
from edgepack.sources import fetch_model, is_hub_id, resolve_model, resolve_path, split_weight
from edgepack.stages import StageSpec, get_stage

_RECIPE_KEYS = {"name", "model", "targets", "workdir", "trust_pickle", "description", "eval_text", "eval_max_tokens"}


@dataclass
class Step:
    index: int
    spec: StageSpec
    config: object
    raw: dict  # config as written, for --dry-run
    per_target: dict = field(default_factory=dict)  # target name -> (config, raw) overriding the above
    skip: dict = field(default_factory=dict)  # target name -> why this stage does not run for it

    def for_target(self, target) -> tuple[object, dict]:
        name = getattr(target, "name", None)
        return self.per_target.get(name, (self.config, self.raw))


@dataclass
class Recipe:
    name: str
    model: Path | str  # a hub id stays a string until the run fetches it
    targets: list  # Target objects
    workdir: Path
    steps: list[Step]
    source: str
    trust_pickle: bool = False
    description: str = ""
    # one held-out text every stage's output (and the input) is also scored on, under one protocol, so quality reads
    # across the chain; "" = none. eval_max_tokens caps the scored tokens (None: the whole text)
    eval_text: str = ""
    eval_max_tokens: int | None = 4096


def load_recipe(path, workdir: Path | None = None, data: dict | None = None) -> Recipe:
    from edgepack.targets import load_target

    path = Path(path)
    if data is None:
        if not path.is_file():
            raise ConfigError(f"recipe '{path}' does not exist", "check the path to the .toml file")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"recipe '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start})",
                              "save the recipe as UTF-8") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"recipe '{path}' is not valid TOML ({exc})", "fix the TOML syntax") from None
    base = path.parent.absolute()
    problems = [f"unknown top-level table '{k}'{did_you_mean(k, ['recipe', 'stages'])}" for k in data if k not in ("recipe", "stages")]
    head = data.get("recipe", {})
    problems += [f"[recipe] unknown key '{k}'{did_you_mean(k, _RECIPE_KEYS)}" for k in head if k not in _RECIPE_KEYS]
    if "model" not in head:
        problems.append("[recipe] needs 'model' (a Hugging Face checkpoint directory or an artifact)")
    stages = data.get("stages", [])
    if not isinstance(stages, list) or not stages:
        problems.append("a recipe needs at least one [[stages]] table with a 'kind'")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems), "see examples/ for a complete recipe")
    name = str(head.get("name", path.stem))
    targets = [load_target(t if not str(t).endswith(".toml") else str(resolve_path(t, base)))
               for t in head.get("targets", ["local"])]
    steps = []
    for i, raw in enumerate(stages):
        raw = dict(raw)
        kind = raw.pop("kind", None)
        if kind is None:
            raise ConfigError(f"{path}: stage {i + 1} has no 'kind'", "add kind = \"convert\" (or another stage)")
        spec = get_stage(kind)
        cls = spec.config_class()
        overrides = raw.pop("per_target", {})
        where = f"{path}: stage {i + 1} ({kind})"
        if overrides and (not spec.per_target or not isinstance(overrides, dict)):
            raise ConfigError(f"{where}: per_target needs a target-specific stage and a table per target name",
                              "per-target settings exist for quantize, compile, bench, bundle")
        names = [t.name for t in targets]
        bad = [n for n in overrides if n not in names]
        if bad:
            raise ConfigError(f"{where}: per_target names '{bad[0]}', which is not among the recipe's targets"
                              f"{did_you_mean(bad[0], names)}", f"targets: {', '.join(names)}")
        for key in path_fields(cls):
            for table in (raw, *overrides.values()):
                if isinstance(table, dict) and table.get(key):
                    table[key] = _resolve_paths(table[key], base)
        per, skip = {}, {}
        for tname, extra in overrides.items():
            if not isinstance(extra, dict):
                raise ConfigError(f"{where}: per_target.{tname} must be a table of settings", "see README Recipes")
            extra = dict(extra)
            why = extra.pop("skip", None)
            if why:
                skip[tname] = why if isinstance(why, str) else "skipped for this target by the recipe"
            merged = {**raw, **extra}
            per[tname] = (build_config(cls, merged, f"{where} for {tname}"), merged)
        steps.append(Step(i + 1, spec, build_config(cls, raw, where), raw, per, skip))
    wd = workdir or (resolve_path(head["workdir"], base) if "workdir" in head else Path("edgepack-runs") / name)
    return Recipe(name=name, model=resolve_model(str(head["model"]), base), targets=targets, workdir=Path(wd).absolute(),
                  steps=steps, source=str(path), trust_pickle=bool(head.get("trust_pickle", False)),
                  description=str(head.get("description", "")),
                  eval_text=str(resolve_path(str(head["eval_text"]), base)) if head.get("eval_text") else "",
                  eval_max_tokens=_max_tokens(head.get("eval_max_tokens", 4096), path))


def _max_tokens(value, path) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 16):
        return value
    raise ConfigError(f"{path}: [recipe] eval_max_tokens must be an integer >= 16, got {value!r}",
                      "e.g. eval_max_tokens = 4096")


def _resolve_paths(value, base: Path):
    """A path setting against the recipe's folder: one path, or a list of weighted "path:weight" sources (a mix)."""
    if not isinstance(value, list):
        return str(resolve_path(str(value), base))
    out = []
    for item in value:
        path, weight = split_weight(str(item))
        out.append(str(resolve_path(path, base)) + ("" if weight is None else ":" + str(item).rpartition(":")[2]))
    return out


def _file_key(value) -> dict:
    path, weight = split_weight(str(value))
    p = Path(value) if Path(value).exists() else Path(path)
    key = {"name": p.name, "sha256": sha256_file(p) if p.is_file() else "missing"}
    return key if weight is None or p == Path(value) else {**key, "weight": weight}


def chain_digest(step_hash_hex: str, files_digest_hex: str) -> str:
    """What the next step is keyed on: the step that made the artifact AND its files. Files alone are not enough:
    a stage that only adds evidence (bench links the model files and records measurements) leaves them unchanged,
    so a re-measured bench must still give its bundle a new key."""
    return hashlib.sha256(f"{step_hash_hex}\0{files_digest_hex}".encode()).hexdigest()


def step_hash(parent_digest: str, step: Step, target) -> str:
    config = step.for_target(target)[0]
    cfg = asdict(config)
    for key in path_fields(type(config)):  # the content of a data file, not its path, decides the output
        if isinstance(cfg.get(key), (list, tuple)):  # a weighted mix of sources
            cfg[key] = [_file_key(item) for item in cfg[key]]
        elif cfg.get(key):
            cfg[key] = _file_key(cfg[key])
    blob = json.dumps({"parent": parent_digest, "kind": step.spec.kind, "version": step.spec.version, "config": cfg,
                       "target": target.to_dict() if target is not None else None}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class StepResult:
    index: int
    kind: str
    target: str | None
    path: str
    status: str  # ran | cached | planned | skipped (path: the artifact passed on)
    seconds: float  # the stage's run time; for a cached step, the time it took when it ran
    metrics: dict = field(default_factory=dict)
    common: dict | None = None  # perplexity on the recipe's eval_text (or why it could not be scored)


def _branches(recipe: Recipe):
    """[(target or None, steps)]: the shared prefix once, then one branch per target."""
    first = next((i for i, s in enumerate(recipe.steps) if s.spec.per_target), len(recipe.steps))
    shared = recipe.steps[:first]
    rest = recipe.steps[first:]
    return shared, rest


def check_recipe_architecture(recipe: Recipe, src: Artifact) -> None:
    """Every (stage, target) cell of the plan asked about the model's architecture (edgepack/archs.py) before the
    first stage runs, so a recipe that would be refused at its quantize or compile step is refused now, not after
    tune, prune and distill have run."""
    from edgepack.archs import CONV1D, FUSED, arch, check_arch, is_mla, is_moe
    from edgepack.errors import EdgepackError
    from edgepack.facts import read_model_config

    mc = read_model_config(src.path, missing_ok=True)
    if not mc or not (arch(mc) in CONV1D | FUSED or is_mla(mc) or is_moe(mc)):
        return  # the dense Llama-style families: every stage takes them
    for step in recipe.steps:
        for target in (recipe.targets if step.spec.per_target else [None]):
            if target is not None and target.name in step.skip:
                continue
            cfg = step.for_target(target)[0] if step.spec.per_target else step.config
            kind = step.spec.kind
            if kind == "quantize":
                from edgepack.compress.quantize import check_legal, resolve_method

                fmt = check_legal(cfg, target)
                check_arch(kind, mc, method=resolve_method(cfg, target)[0].method, fmt=fmt)
            elif kind == "compile":
                from edgepack.deploy.compile import choose_path

                try:
                    runtime = choose_path(cfg, target)["runtime"]
                except EdgepackError:
                    continue  # the stage itself says what is wrong, with its real source
                if runtime != "torch-cuda":
                    check_arch(kind, mc)
            elif kind in ("prune", "export"):
                check_arch(kind, mc, method=getattr(cfg, "method", None))


def run_recipe(recipe: Recipe, *, dry_run: bool = False, on_step=None) -> list[StepResult]:
    """Fold the model through the stages. on_step(StepResult) is called after each step (for live output)."""
    if dry_run and is_hub_id(recipe.model):  # nothing is downloaded for a dry run
        src = Artifact(Path(recipe.model), {"format": "hf", "base_model": recipe.model, "history": []}, False)
    else:
        src = open_artifact(fetch_model(recipe.model), trust_pickle=recipe.trust_pickle)
    if src.path.exists():
        check_recipe_architecture(recipe, src)  # a stage that cannot take this architecture refuses before any work
    recipe.workdir.mkdir(parents=True, exist_ok=True) if not dry_run else None
    shared, rest = _branches(recipe)
    results: list[StepResult] = []

    def fold(art: Artifact, steps: list[Step], target, subdir: Path) -> Artifact:
        digest = art.digest() if not dry_run or art.path.exists() else "planned"
        passed_on = art.path  # what the next step reads (in a dry run: the planned output of the step before)
        for step in steps:
            if step.spec.per_target and target is not None and target.name in step.skip:
                res = StepResult(step.index, step.spec.kind, target.name, str(passed_on), "skipped", 0.0,
                                 {"skipped": step.skip[target.name]})
                results.append(res)
                if on_step and not dry_run:
                    on_step(res)
                continue
            h = step_hash(digest, step, target if step.spec.per_target else None)
            out = subdir / f"{step.index:02d}-{step.spec.kind}-{h[:12]}"
            # a step in a target's branch belongs to that target even when its output does not depend on it (an
            # eval after compile), so run.json and the report attribute it to the branch, not to every target
            tname = target.name if target is not None else None
            if dry_run:
                res = StepResult(step.index, step.spec.kind, tname, str(out),
                                 "cached" if (out / MANIFEST_NAME).is_file() else "planned", 0.0,
                                 dict(step.for_target(target)[1] if step.spec.per_target else step.raw))
                results.append(res)
                # a cached step gives the real chained digest (so later cached steps show as cached); else a stand-in
                digest = chain_digest(h, open_artifact(out).digest()) if res.status == "cached" else h
                passed_on = out
                continue
            t0 = time.perf_counter()
            if (out / MANIFEST_NAME).is_file():
                art, status = open_artifact(out), "cached"
            else:
                cfg = step.for_target(target)[0] if step.spec.per_target else step.config
                art = step.spec.function()(art, cfg, target if step.spec.per_target else None, out, force=True)
                status = "ran"
            digest = chain_digest(h, art.digest())
            # a cached step keeps the seconds it took when it ran (its manifest's record), not the 0.0 s of finding it
            seconds = (art.history[-1].get("seconds", 0.0) if status == "cached" and art.history
                       else time.perf_counter() - t0)
            res = StepResult(step.index, step.spec.kind, tname, str(out), status, round(seconds, 2),
                             (art.history[-1].get("metrics") if art.history else {}) or {})
            results.append(res)
            if on_step:
                on_step(res)
        return art

    art = fold(src, shared, None, recipe.workdir)
    if rest:
        for target in recipe.targets:
            fold(art, rest, target, recipe.workdir / target.name)
    if not dry_run:
        common = score_common(recipe, src, results) if recipe.eval_text else None
        summary = {"recipe": recipe.source, "name": recipe.name, "model": str(recipe.model),
                   "targets": [t.name for t in recipe.targets], "steps": [asdict(r) for r in results],
                   **({"common_eval": common} if common else {})}
        (recipe.workdir / "run.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return results


def score_common(recipe: Recipe, src: Artifact, results: list[StepResult]) -> dict:
    """Score the input and every step's output on recipe.eval_text (edgepack-ppl-v1, eval_max_tokens), each artifact
    through its own format's scorer (ONNX in onnxruntime, quantized weights as stored), so one number per stage
    compares across the chain. Scores are cached in the workdir by (artifact digest, text sha256, tokens): a re-run
    scores nothing again. An artifact this machine cannot score gets {"error": why}. Sets each result's `common`."""
    from edgepack.errors import EdgepackError
    from edgepack.quality import PplProtocol, evaluate_artifact

    text_sha = sha256_file(Path(recipe.eval_text)) if Path(recipe.eval_text).is_file() else "missing"
    cache_file = recipe.workdir / "common-eval.json"
    try:
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    except json.JSONDecodeError:
        cache = {}

    def score(art: Artifact) -> dict:
        key = f"{art.digest()}:{text_sha}:{recipe.eval_max_tokens}"
        if key not in cache:
            try:
                r = evaluate_artifact(art, recipe.eval_text, PplProtocol(max_tokens=recipe.eval_max_tokens))
                cache[key] = {"perplexity": round(r.perplexity, 6), "tokens": r.tokens}
            except EdgepackError as exc:
                cache[key] = {"error": exc.one_line()}
        return cache[key]

    out = {"text": Path(recipe.eval_text).name, "text_sha256": text_sha, "max_tokens": recipe.eval_max_tokens,
           "protocol": PplProtocol(max_tokens=recipe.eval_max_tokens).describe(), "input": score(src)}
    for r in results:
        if r.status in ("ran", "cached"):
            r.common = score(open_artifact(r.path))
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    tmp.replace(cache_file)
    return out
