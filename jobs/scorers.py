"""`--score` and `--keep`: quality signals per image on the actor, and the rule that decides which images to keep.

Scores (sdcore.scoring), each a metadata column, null where not asked for:
- `clip`: `clip_score`, 100 * max(cos, 0) of the image and its prompt (--clip-model's towers);
- `nsfw`: `nsfw_score` and `nsfw`, the SD release's safety checker (--safety-checker, default the
  model's own); nothing is blacked out;
- `aesthetic`: `aesthetic_score`, the LAION predictor (--aesthetic-model) on --clip-model's image embeddings.
Scorers run in float32 whatever the job's dtype: next to the UNet they cost little, and the scores
of a dataset stay comparable whichever device made its shards.

`--keep EXPR` is a boolean expression over the score columns and the row's parameters, e.g.
`clip_score >= 26 and not nsfw`. It is parsed with `ast` and walked node by node, never run as
Python: only comparisons, and/or/not, column names and constants are allowed. A row whose image
fails it is made again with the next seed, up to --max-attempts attempts (see `attempt_seed`).
"""
import ast
import hashlib
import operator
from dataclasses import dataclass
from pathlib import Path

import torch

from jobs.manifest import MAX_SEED
from sdcore import scorer_weights, scoring
from sdcore.errors import WeightsError

SCORES = ("clip", "nsfw", "aesthetic")
SCORE_COLUMNS = {"clip": ("clip_score",), "nsfw": ("nsfw_score", "nsfw"), "aesthetic": ("aesthetic_score",)}
# The row's parameters a rule may name besides the scores (the seed changes from attempt to attempt).
PARAM_COLUMNS = ("prompt", "negative_prompt", "steps", "guidance_scale", "width", "height", "scheduler")
DEFAULT_MAX_ATTEMPTS = 3
COMPARISONS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
               ast.Gt: operator.gt, ast.GtE: operator.ge}


class KeepRuleError(ValueError):
    """--keep is not an expression sdbatch evaluates, or names an unknown column: bad input."""


def attempt_seed(seed: int, attempt: int) -> int:
    """The seed of a row's `attempt` (1, 2, ...): its own seed first, then sha256("{seed}:{attempt}")'s
    first 8 bytes, big-endian, shifted right by one into [0, 2^63). It depends on nothing else: not on
    the batch, the shard or the actor."""
    if attempt == 1:
        return seed
    digest = hashlib.sha256(f"{seed}:{attempt}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 1) % MAX_SEED


class KeepRule:
    """A parsed --keep expression. `clauses` are its top-level `and` parts (the whole rule when it
    has none): `sdbatch status` reports the pass rate of each."""

    def __init__(self, text: str, columns: tuple[str, ...]):
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError as e:
            raise KeepRuleError(f"--keep {text!r}: not an expression ({e.msg})") from None
        self.text = text
        for node in ast.walk(tree):
            self._check(node, columns)
        body = tree.body
        parts = body.values if isinstance(body, ast.BoolOp) and isinstance(body.op, ast.And) else [body]
        self._clauses = parts
        self.clauses = [ast.unparse(p) for p in parts]
        self.columns = sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)})

    def _check(self, node: ast.AST, columns: tuple[str, ...]) -> None:
        allowed = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.Compare,
                   ast.Name, ast.Load, ast.Constant, *COMPARISONS)
        if not isinstance(node, allowed):
            what = ast.unparse(node) if isinstance(node, ast.expr) else type(node).__name__
            raise KeepRuleError(f"--keep {self.text!r}: {what} is not allowed; use comparisons, and, or, not, "
                                "column names and numbers or strings")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) \
                and not isinstance(node.operand, ast.Constant):
            raise KeepRuleError(f"--keep {self.text!r}: minus applies to numbers only")
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str)):
            raise KeepRuleError(f"--keep {self.text!r}: {node.value!r} is not a number or a string")
        if isinstance(node, ast.Name) and node.id not in columns:
            raise KeepRuleError(f"--keep {self.text!r}: unknown column {node.id!r}; it may name "
                                f"{', '.join(columns)}")

    def clause_results(self, row: dict) -> list[bool]:
        """Whether `row` passes each clause; it passes the rule iff all are true. A null score
        (an image not scored) passes no comparison."""
        return [bool(_evaluate(clause, row)) for clause in self._clauses]


def _evaluate(node: ast.AST, row: dict):
    if isinstance(node, ast.BoolOp):
        values = (_evaluate(v, row) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand, row)
        return (not value) if isinstance(node.op, ast.Not) else -value
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, row)
        for op, right_node in zip(node.ops, node.comparators):
            right = _evaluate(right_node, row)
            try:
                if left is None or right is None or not COMPARISONS[type(op)](left, right):
                    return False
            except TypeError:  # a number against a string
                return False
            left = right
        return True
    if isinstance(node, ast.Name):
        return row[node.id]
    return node.value  # ast.Constant, the only node left after KeepRule._check


@dataclass(frozen=True)
class ScoreSpec:
    """--score, the scorers' sources (as resolved by jobs.sources) and --keep, --max-attempts, --drop-rejected."""

    scores: tuple[str, ...] = ()
    clip_model: str | None = None
    safety_checker: str | None = None
    aesthetic_model: str | None = None
    keep: str | None = None
    max_attempts: int = 1
    drop_rejected: bool = False

    def rule(self) -> KeepRule | None:
        columns = tuple(c for s in self.scores for c in SCORE_COLUMNS[s]) + PARAM_COLUMNS
        return None if self.keep is None else KeepRule(self.keep, columns)

    def identity(self) -> dict:
        """What decides which images a dataset holds (job.json's identity; the fingerprints come from the actors)."""
        return {"scores": list(self.scores), "keep": self.keep or "", "max_attempts": self.max_attempts,
                "drop_rejected": self.drop_rejected}


def parse_scores(text: str | None) -> tuple[str, ...]:
    """--score clip,nsfw -> ("clip", "nsfw") in SCORES' order."""
    if not text:
        return ()
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCORES]
    if unknown:
        raise KeepRuleError(f"--score {text}: unknown score {', '.join(unknown)}; choose from {', '.join(SCORES)}")
    return tuple(s for s in SCORES if s in names)


class Scorers:
    """The scorers of a job, loaded on the actor's device from local paths (jobs.sources.resolve)."""

    def __init__(self, spec: ScoreSpec, paths: dict[str, str], device: torch.device):
        self.scores, self.device = spec.scores, device
        self.fingerprints: dict[str, str] = {}
        self.clip = self.checker = self.aesthetic = None
        if "clip" in self.scores or "aesthetic" in self.scores:
            self.clip, self.tokenizer = scorer_weights.load_clip(paths["clip"], device=device)
            self.clip_size = self.clip.vision_model.config.image_size
            self.fingerprints["clip"] = scorer_weights.files_fingerprint(
                paths["clip"], scorer_weights.clip_files(_listing(paths["clip"])))
        if "nsfw" in self.scores:
            self.checker, self.checker_size = scorer_weights.load_safety_checker_folder(paths["nsfw"], device=device)
            self.fingerprints["nsfw"] = scorer_weights.files_fingerprint(
                paths["nsfw"], scorer_weights.safety_checker_files(_listing(paths["nsfw"])))
        if "aesthetic" in self.scores:
            path = Path(paths["aesthetic"])
            self.aesthetic = scorer_weights.load_aesthetic_predictor(path, device=device)
            wants, gets = self.aesthetic.layers[0].in_features, self.clip.visual_projection.out_features
            if wants != gets:
                raise WeightsError(
                    f"--aesthetic-model {path}: takes {wants}-wide image embeddings, but --clip-model gives "
                    f"{gets}-wide ones (the predictor needs ViT-L/14's)")
            self.fingerprints["aesthetic"] = scorer_weights.files_fingerprint(path.parent, [path.name])

    def score(self, prompts: list[str], images: list) -> list[dict]:
        """Decoded images (uint8 [H, W, 3]) and their prompts -> per image the score columns. On the
        CPU one image per call: a one-row matmul rounds otherwise than a batch's, and a score must not
        depend on the images beside it, since the keep rule's verdict, and so the dataset, follow it."""
        step = 1 if self.device.type == "cpu" else max(len(images), 1)
        return [row for i in range(0, len(images), step)
                for row in self._score(prompts[i:i + step], images[i:i + step])]

    @torch.no_grad()
    def _score(self, prompts: list[str], images: list) -> list[dict]:
        rows = [{c: None for s in SCORES for c in SCORE_COLUMNS[s]} for _ in images]
        if self.clip is not None:
            image_embeds = self.clip(scoring.preprocess(images, self.clip_size).to(self.device))
            if "clip" in self.scores:
                text_embeds = self.clip.embed_text(self.tokenizer(prompts).to(self.device))
                for row, value in zip(rows, scoring.clip_score(image_embeds, text_embeds).tolist()):
                    row["clip_score"] = value
            if self.aesthetic is not None:
                for row, value in zip(rows, self.aesthetic(image_embeds).tolist()):
                    row["aesthetic_score"] = value
        if self.checker is not None:
            nsfw_score, nsfw = self.checker(scoring.preprocess(images, self.checker_size).to(self.device))
            for row, value, flagged in zip(rows, nsfw_score.tolist(), nsfw.tolist()):
                row["nsfw_score"], row["nsfw"] = value, flagged
        return rows


def _listing(folder: str) -> list[str]:
    root = Path(folder)
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]


def keep_report(out) -> dict | None:
    """For a job with --keep (None otherwise), from its done shards' metadata: rows, kept, rejected
    (dropped: without their image), attempts spent, and per clause of the rule the attempts that passed it."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    from jobs import sink, storage

    job = out.read_job()
    keep = sink.identity_of(job).get("keep")
    if not keep:
        return None
    clauses = KeepRule(keep, tuple(c for cs in SCORE_COLUMNS.values() for c in cs) + PARAM_COLUMNS).clauses
    columns = ["attempt", "kept", "keep_clauses_passed", "image_path"]

    def read(shard: str):
        try:
            with storage.open_for_arrow(out.fs, out.path(sink.metadata_path(shard))) as f:
                return pq.read_table(f, columns=columns).to_pydict()
        except (OSError, ValueError):  # a damaged file: `sdbatch status` names it
            return {c: [] for c in columns}

    report = {"rule": keep, "rows": 0, "kept": 0, "rejected": 0, "dropped": 0, "attempts": 0,
              "clauses": [{"clause": c, "passed": 0} for c in clauses]}
    with ThreadPoolExecutor(16) as pool:  # object stores answer slowly but in parallel
        for table in pool.map(read, sorted(out.done_shards())):
            report["rows"] += len(table["kept"])
            report["kept"] += sum(table["kept"])
            report["dropped"] += sum(p is None for p in table["image_path"])
            report["attempts"] += sum(table["attempt"])
            for passed in table["keep_clauses_passed"]:
                for clause, n in zip(report["clauses"], passed):
                    clause["passed"] += n
    report["rejected"] = report["rows"] - report["kept"]
    return report


def format_keep_report(report: dict) -> str:
    attempts = report["attempts"]
    per_row = f" ({attempts / report['rows']:.2f} per row)" if report["rows"] else ""
    lines = [f"  keep      {report['rule']!r}: {report['kept']:,} of {report['rows']:,} rows kept, "
             f"{report['rejected']:,} rejected ({report['dropped']:,} without their image); "
             f"{attempts:,} attempts{per_row}"]
    for clause in report["clauses"]:
        rate = f"{100 * clause['passed'] / attempts:.1f}%" if attempts else "-"
        lines.append(f"    {clause['clause']:<40} passed {clause['passed']:,} of {attempts:,} attempts ({rate})")
    return "\n".join(lines)
