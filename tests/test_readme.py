"""Every `sdbatch` command line in README.md's code blocks is one the CLI accepts, and the ones that
run locally do run: with `builtin:tiny` in place of real weights and outputs redirected to tmp.
The `hf download` line fetches exactly the release files that sdbatch reads."""
import fnmatch
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import typer.main
from typer._click.core import Context  # typer carries its own click
from typer._click.exceptions import UsageError
from typer.testing import CliRunner

import torch

from jobs.cli import app
from reference import SD15
from sdcore.builtin import write_tiny_adapters
from sdcore.weights import folder_files

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SDBATCH = str(ROOT / ".venv" / "bin" / "sdbatch")
TINY_SIZE = ["--width", "64", "--height", "64", "--steps", "2"]


def readme_commands(program: str = "sdbatch") -> list[list[str]]:
    """argv (from `program` on) of every command in the README's shell code blocks, in order."""
    blocks = re.findall(r"```(?:sh|bash)\n(.*?)```", README.read_text(), re.S)
    found = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if program in argv:
            found.append(argv[argv.index(program):])
    return found


COMMANDS = readme_commands()


def resolve(argv: list[str]) -> tuple[list[str], object, list[str]]:
    """(the subcommand path, its click command, its arguments)."""
    command, path, rest = typer.main.get_command(app), [], argv[1:]
    while hasattr(command, "commands"):  # a group
        assert rest, f"{' '.join(argv)}: no subcommand"
        name, rest = rest[0], rest[1:]
        sub = command.get_command(Context(command), name)
        assert sub is not None, f"{' '.join(argv)}: no command {name!r}; the CLI has {sorted(command.commands)}"
        command, path = sub, [*path, name]
    return path, command, rest


def test_the_readme_has_commands_to_check():
    assert "make demo" in README.read_text() and "make test" in README.read_text()
    used = {" ".join(resolve(argv)[0]) for argv in COMMANDS}
    assert used >= {"run", "validate", "status", "preview", "generate", "manifest build"}, used


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_readme_command_parses(argv):
    """Every option exists, has a valid value, and every required argument is there."""
    path, command, rest = resolve(argv)
    try:
        command.make_context(f"sdbatch {' '.join(path)}", list(rest), resilient_parsing=False)
    except UsageError as e:
        pytest.fail(f"README: `{' '.join(argv)}`: {e.format_message()}")


def test_readme_commands_run(tmp_path):
    """The local ones, in README order, so that `status` and `preview` read what `run` wrote. Adapters
    declared with --lora and --embedding become the tiny model's, under the same names."""
    runner, outputs, ran = CliRunner(), {}, []
    tiny_adapters = write_tiny_adapters(tmp_path / "adapters")

    def redirect(value: str) -> str:
        outputs.setdefault(value, str(tmp_path / value.lstrip("./").replace("/", "_")))  # keeps the extension
        return outputs[value]

    for argv in COMMANDS:
        if any("://" in a for a in argv):
            continue  # object storage and clusters: covered by the S3 and cluster tests
        path, command, rest = resolve(argv)
        args = list(rest)
        for i, a in enumerate(args[:-1]):
            if a in ("-o", "--output"):
                args[i + 1] = redirect(args[i + 1])
            if a in ("--lora", "--embedding"):
                name = args[i + 1].partition("=")[0]
                args[i + 1] = f"{name}={tiny_adapters['lora' if a == '--lora' else 'embedding']}"
            if a == "--model" and args[i + 1] != "builtin:tiny":
                if path == ["run"]:
                    break  # real weights on a real manifest: too slow here; parsed above
                args[i + 1] = "builtin:tiny"
                args += TINY_SIZE
        else:
            if path in (["status"], ["preview"], ["verify"]):
                args = [outputs.get(a, a) for a in args]
            if path == ["run"]:  # Ray in its own process, as users run it
                r = subprocess.run([SDBATCH, *path, *args], capture_output=True, text=True, timeout=180)
                assert r.returncode == 0, (argv, r.stderr)
                output = r.stdout
            else:
                r = runner.invoke(app, [*path, *args])
                assert r.exit_code == 0, (argv, r.output, r.exception)
                output = r.output
            ran.append((path, args, output))
            if path == ["manifest", "build"]:
                built = args[args.index("-o") + 1]
                assert runner.invoke(app, ["validate", built]).exit_code == 0

    done = {" ".join(p) for p, _, _ in ran}
    assert done >= {"run", "validate", "status", "preview", "generate", "manifest build", "verify"}, done
    status = next(out for p, _, out in ran if p == ["status"])
    assert "_SUCCESS  yes" in status and "images/s" in status
    preview = next(a for p, a, _ in ran if p == ["preview"])
    assert Path(preview[preview.index("-o") + 1]).stat().st_size > 0


def test_the_hf_download_line_fetches_what_sdbatch_reads_at_fp16():
    (argv,) = [a for a in readme_commands("hf") if a[1] == "download"]
    assert argv[2] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    start = argv.index("--include") + 1
    patterns = argv[start:next((i for i, a in enumerate(argv) if i >= start and a.startswith("-")), len(argv))]
    release = (SD15 / "files.txt").read_text().split()
    fetched = {f for f in release if any(fnmatch.fnmatch(f, p) for p in patterns)}
    assert fetched == set(folder_files(release, torch.float16))
