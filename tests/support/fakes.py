"""In-memory stand-ins for the pipeline's services (queue aside: the real one is a small file):
MLflow (`Tracker`), DVC and git (`Versioner`), and the compute (`Runner`), so the request logic of
`cul.pipeline` runs in milliseconds."""

from __future__ import annotations

from pathlib import Path

from cul.evaluation import StepMetrics, retention
from cul.io.tracking import ChampionInfo
from cul.world import CONCEPTS

ALL = [c.name for kind in CONCEPTS.values() for c in kind]


def metrics_for(
    scores: dict[str, float], forgotten: list[str], fd_ratio: float = 1.0, base_scores: dict[str, float] | None = None
) -> StepMetrics:
    """A candidate's evaluation, built the way the evaluator reports it: per-concept scores, the
    retention figures derived from them, and the base model's figures on the same scenes."""
    per_concept = {n: 1.0 for n in ALL} | scores
    base = retention(base_scores or {n: 1.0 for n in ALL}, forgotten)
    return StepMetrics(
        per_concept=per_concept,
        **retention(per_concept, forgotten),
        fd_ratio=fd_ratio,
        ua=1 - per_concept[forgotten[-1]],
        base=base,
    )


def evaluation(forgotten: list[str], left: float) -> dict:
    """An attempt's metrics where the last forgotten concept is still drawn in `left` of its images."""
    scores = {n: 1.0 for n in ALL} | {f: 0.0 for f in forgotten} | {forgotten[-1]: left}
    return {
        "concept": forgotten[-1],
        "per_concept": scores,
        "ua": 1 - left,
        **retention(scores, forgotten),
        "fd_ratio": 1.1,
        "base": {"ua": 0.0, **retention({n: 1.0 for n in ALL}, forgotten)},
        "forgotten": forgotten,
        # as the real step records them: the replay time is the data's, made once per request
        "seconds_replay": 50.0,
        "seconds_train": 3.0,
        "seconds_step": 53.0,
        "seconds_eval": 1.0,
    }


class Tracker:
    def __init__(self, champion: ChampionInfo | None = None) -> None:
        self.champ, self.runs, self.versions, self.version_tags = champion, {}, [], {}

    def champion(self):
        return self.champ

    def candidate(self):
        return ChampionInfo(version=len(self.versions), step=None, forgotten=[]) if self.versions else None

    def fetch_weights(self, version, dest):
        return dest

    def open_request(self, request_id, concept, tags):
        return self._open(f"{request_id}-forget-{concept}", tags)

    def open_attempt(self, parent_run_id, attempt, params, tags):
        return self._open(f"attempt-{attempt}", {**tags, "parent": parent_run_id}, params)

    def _open(self, name, tags, params=None):
        run_id = f"run{len(self.runs)}"
        self.runs[run_id] = {"name": name, "tags": dict(tags), "params": params or {}, "status": "RUNNING"}
        return run_id

    def log_attempt(self, run_id, metrics, verdict, report_dir):
        self.runs[run_id]["gate"] = verdict.accepted

    def close(self, run_id, ok=True):
        self.runs[run_id]["status"] = "FINISHED" if ok else "FAILED"

    def set_outcome(self, run_id, outcome):
        self.runs[run_id]["tags"]["outcome"] = outcome

    def register(self, run_id, model_dir, tags, auto_promote=False):
        self.versions.append({"run": run_id, "model_dir": Path(model_dir), "tags": dict(tags)})
        return len(self.versions)

    def tag_version(self, version, key, value):
        self.version_tags[(version, key)] = value

    def fail_open_runs(self, request_id):
        hit = [r for r in self.runs.values() if r["tags"].get("request_id") == request_id and r["status"] == "RUNNING"]
        for r in hit:
            r["status"] = "FAILED"
        return len(hit)


class Versioner:
    def __init__(self) -> None:
        self.recorded, self.pushed, self.commits = [], [], []

    def head(self):
        return "c0ffee"

    def staged(self):
        return []

    def record_step(self, key):
        self.recorded.append(key)
        return f"md5-{key}.dir"

    def push(self, *targets):
        self.pushed.extend(targets)

    def commit(self, message, paths):
        self.commits.append((message, paths))
        return f"rev{len(self.commits)}"

    def sync(self):
        return self.head()

    def publish(self):
        return f"rev{len(self.commits)}"


class Runner:
    """The compute: each attempt leaves the concept in the next share of `left` of its images."""

    def __init__(self, left: list[float]) -> None:
        self.left, self.specs = list(left), []

    def prepare(self, spec):
        spec.data_dir.mkdir(parents=True, exist_ok=True)
        return str(spec.data_dir)

    def attempt(self, spec, data_dir, run_id):
        self.specs.append(spec)
        for d in (spec.model_dir, spec.report_dir):
            d.mkdir(parents=True, exist_ok=True)
        return evaluation(spec.forgotten + [spec.request.concept], self.left.pop(0))
