"""Helpers for the deploy tests: render the Helm chart with the Helm SDK, and read metric names out
of PromQL queries and out of the code's Prometheus registries."""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
from pathlib import Path, PurePosixPath

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "mot-operator"
RELEASE = "mot-operator"
RELEASE_NAMESPACE = "mot-system"

FIXTURES = ()

# Values sets the chart is tested with: the defaults and the non-default modes users pick.
VALUES_CASES = {
    "default": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "monitoring": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
                    "podMonitor": {"enabled": True}},
        "alerts": {"enabled": True, "noProgress": {"thresholdSeconds": 3600, "for": "15m"},
                   "jobRetries": {"threshold": 5, "window": "2h"}},
        "dashboard": {"namespace": "monitoring", "labels": {"grafana_dashboard": "mot"}},
    },
    "custom-image": {
        "image": {"repository": "registry.example.com/ml/mot-operator", "tag": "1.2.3"},
        "defaults": {
            "trainerImage": {"repository": "registry.example.com/ml/mot-trainer",
                             "digest": "sha256:" + "ab" * 32},
            "storage": {"uri": "s3://mot-checkpoints/runs", "endpoint": "http://minio.storage:9000",
                        "credentialsSecret": "mot-s3"},
        },
        "imagePullSecrets": [{"name": "regcred"}],
        "logLevel": "debug",
        "logFormat": "text",
        "metrics": {"port": 9090},
        "serviceAccount": {"name": "mot-controller"},
        "extraArgs": ["--log-level", "debug"],
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
    },
}


def load_chart():
    import helm_python as helm  # imported here: loading the Go library is not free

    return helm.Chart.load(CHART_DIR)


def render(values: dict | None = None, *, name: str = RELEASE,
           namespace: str = RELEASE_NAMESPACE) -> dict[str, list[dict]]:
    """Render the chart offline: {template path: [manifest, ...]} (NOTES.txt kept as text in `notes`)."""
    with load_chart() as chart:
        rendered = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
    out: dict[str, list[dict]] = {}
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        docs = [doc for doc in yaml.safe_load_all(text) if doc]
        if docs:
            out[path] = docs
    return out


def render_notes(values: dict | None = None) -> str:
    with load_chart() as chart:
        rendered = chart.render(values or {}, name=RELEASE, namespace=RELEASE_NAMESPACE, is_install=True)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def manifests(values: dict | None = None, **kwargs) -> list[dict]:
    return [doc for docs in render(values, **kwargs).values() for doc in docs]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


# ---------------------------------------------------------------------------------------------------
# Metric names

# Names Prometheus itself provides for every target.
PROMETHEUS_BUILTINS = {"up"}

_PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                    "group_left", "group_right", "inf", "nan", "start", "end", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (Grafana `$variables` allowed).

    Strings, label matchers, ranges and grouping clauses are removed first; what is left that looks
    like an identifier and is not a function call or keyword is a metric name."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end():].lstrip().startswith("("):
            continue  # a function: rate(, sum(, histogram_quantile(
        if match.group().lower() in _PROMQL_KEYWORDS:
            continue
        names.add(match.group())
    return names


def registry_sample_names(registry) -> set[str]:
    """Every series name a prometheus_client registry can expose, labelled or not yet observed."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def exported_metric_names() -> set[str]:
    """What the operator and the trainer really export (their registries), plus Prometheus's `up`."""
    from mot_operator.metrics import REGISTRY as OPERATOR_REGISTRY
    from mot_trainer.progress import REGISTRY as TRAINER_REGISTRY

    return registry_sample_names(OPERATOR_REGISTRY) | registry_sample_names(TRAINER_REGISTRY) | PROMETHEUS_BUILTINS


# ---------------------------------------------------------------------------------------------------
# The Dockerfile and its build context, as Docker sees them (no container engine runs here)

DOCKERFILE = REPO / "Dockerfile"


def dockerfile_stages(dockerfile: Path = DOCKERFILE) -> dict[str, list[str]]:
    """{stage name: its instructions, continuation lines joined}."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    found: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = match.group(2) or match.group(1)
            found[current] = [line]
        elif current:
            found[current].append(line)
    return found


def dockerfile_args(dockerfile: Path = DOCKERFILE) -> dict[str, str]:
    """The ARG defaults: {name: value}."""
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", dockerfile.read_text(), re.MULTILINE))


class DockerIgnore:
    """A .dockerignore read and matched as Docker does (moby/patternmatcher, the docker CLI's context
    walk): each pattern is cleaned and matched against the path relative to the context root; `*` and
    `?` never match `/`, `**` matches any number of directories; a pattern that matches a parent
    directory matches everything under it; the last pattern that matches decides, and `!` re-includes."""

    def __init__(self, text: str):
        self.patterns: list[tuple[bool, str, re.Pattern]] = []  # (re-include, cleaned pattern, regex)
        for line in text.lstrip("\ufeff").splitlines():
            if line.startswith("#"):
                continue
            line = line.strip()
            if not line:
                continue
            include = line.startswith("!")
            pattern = line[1:].strip() if include else line
            if not pattern:
                continue
            pattern = os.path.normpath(pattern).replace(os.sep, "/")
            if pattern.startswith("//"):  # normpath keeps a leading "//"; Go's Clean does not
                pattern = "/" + pattern.lstrip("/")
            if len(pattern) > 1 and pattern.startswith("/"):
                pattern = pattern[1:]
            self.patterns.append((include, pattern, re.compile(self._regex(pattern))))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "^", 0
        while i < len(pattern):
            ch = pattern[i]
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):
                    i += 1
                out += ".*" if i == len(pattern) else "(.*/)?"
                continue
            if ch == "*":
                out += "[^/]*"
            elif ch == "?":
                out += "[^/]"
            elif ch in ".+()|{}$^":
                out += "\\" + ch
            elif ch == "\\":
                i += 1
                out += "\\" + pattern[i] if i < len(pattern) else "\\\\"
            else:
                out += ch  # letters, "/", and "[...]" classes as in Go's filepath.Match
            i += 1
        return out + "$"

    def excluded(self, path: str) -> bool:
        """Whether the file or directory at `path` (relative, "/"-separated) stays out of the context."""
        parts = path.split("/")
        parents = ["/".join(parts[:n]) for n in range(1, len(parts))]
        matched = False
        for include, _, regex in self.patterns:
            if include != matched:  # only an exclusion can change "kept", only a `!` "excluded"
                continue
            if regex.match(path) or any(regex.match(parent) for parent in parents):
                matched = not include
        return matched

    def may_reinclude_under(self, directory: str) -> bool:
        """The docker CLI descends into an excluded directory only when a `!` pattern starts with it."""
        prefix = directory + "/"
        return any((pattern + "/").startswith(prefix) for include, pattern, _ in self.patterns if include)


def build_context(source: Path, context: Path) -> list[str]:
    """Copy into `context` what `docker build source` sends: the files .dockerignore lets through,
    symlinks kept as symlinks (never followed). Returns the paths copied, relative and sorted."""
    ignore_file = source / ".dockerignore"
    ignore = DockerIgnore(ignore_file.read_text() if ignore_file.exists() else "")
    copied = []
    context.mkdir(parents=True, exist_ok=True)
    for root, dirs, files in os.walk(source):  # os.walk does not follow directory symlinks
        base = Path(root).relative_to(source)
        for name in sorted(dirs):
            rel = (base / name).as_posix()
            if (Path(root) / name).is_symlink():
                dirs.remove(name)
                files.append(name)  # a link is copied as a link, whatever it points to
            elif ignore.excluded(rel):
                if not ignore.may_reinclude_under(rel):
                    dirs.remove(name)
            else:
                (context / rel).mkdir(parents=True, exist_ok=True)
                copied.append(rel)
        for name in sorted(files):
            rel = (base / name).as_posix()
            if ignore.excluded(rel):
                continue
            (context / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, context / rel, follow_symlinks=False)
            copied.append(rel)
    return sorted(copied)


def _instruction_args(line: str) -> list[str]:
    """The arguments of a COPY/WORKDIR line, exec (JSON) or shell form, flags (`--chown=...`) dropped."""
    rest = line.split(None, 1)[1].strip()
    words = json.loads(rest) if rest.startswith("[") else rest.split()
    return [word for word in words if not word.startswith("--")]


def apply_copies(instructions: list[str], context: Path, root: Path) -> Path:
    """Perform a stage's COPY instructions from the build context (not `COPY --from`) into `root`, a
    stand-in for the image's `/`, following WORKDIR. Like Docker: a source directory's contents go into
    the destination, a destination ending in `/` (or several sources) is a directory, links inside stay
    links, and a source missing from the context fails. Returns the stage's last WORKDIR under root."""
    workdir = PurePosixPath("/")
    for line in instructions:
        keyword = line.split(None, 1)[0].upper()
        if keyword == "WORKDIR":
            workdir = workdir / _instruction_args(line)[0]
            (root / workdir.relative_to("/")).mkdir(parents=True, exist_ok=True)
        if keyword != "COPY" or "--from" in line:
            continue
        *sources, dest = _instruction_args(line)
        target = root / (workdir / dest).relative_to("/")
        as_directory = dest.endswith("/") or len(sources) > 1
        for pattern in sources:
            relative = posixpath.normpath(pattern).lstrip("/")
            matches = [context] if relative == "." else sorted(context.glob(relative))
            matches = [src for src in matches if src.exists()]  # a dangling link fails, as in Docker
            assert matches, f"{line}: {pattern} is not in the build context (.dockerignore?)"
            for src in matches:  # the source itself is followed if a link; links under it are kept
                if src.is_dir():
                    shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
                else:
                    into = target / src.name if as_directory or target.is_dir() else target
                    into.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, into)
    return root / workdir.relative_to("/")
