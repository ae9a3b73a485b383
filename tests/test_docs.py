"""The README and docs/ pages name only commands that exist: every `python -m MODULE ...` they show names an importable
module, each `--flag` is one that module's `--help` (absl: `--helpfull`) lists, and each `--config.KEY` override is a
key of the config file the command names (configs/base.py when it names none)."""

import concurrent.futures
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
OUR_PACKAGES = ("atr_jax", "data_pipelines", "scripts")
# Third-party tools the docs name, with how they are installed (not our requirements).
EXTERNAL_TOOLS = {"build": "pip install build"}
_COMMAND = re.compile(r"python -m ([A-Za-z_][\w.]*)(.*)")
_HELP_FLAG = re.compile(r"--(?:\[no\])?([A-Za-z_][\w-]*)")


def documented_commands(path: str) -> list[tuple[str, list[str]]]:
  """(module, argument tokens) of each `python -m` command in a markdown file: continuation lines joined, the text
  after an inline command's closing backtick or a shell comment dropped, optional brackets and placeholders kept as
  plain tokens; a launcher's `-- -m MODULE ...` tail is a command of its own."""
  with open(path, encoding="utf-8") as f:
    text = f.read().replace("\\\n", " ")
  commands = []
  for line in text.splitlines():
    for match in _COMMAND.finditer(line):
      module, rest = match.group(1).rstrip("."), match.group(2)
      rest = rest.split("`")[0].split(" # ")[0].split(";")[0]
      rest = rest.replace("[", " ").replace("]", " ").replace("|", " ")
      try:
        tokens = shlex.split(rest)
      except ValueError:  # an unbalanced quote in prose: take the words as they are
        tokens = rest.split()
      if "--" in tokens and tokens[tokens.index("--") + 1 : tokens.index("--") + 2] == ["-m"]:
        tail = tokens[tokens.index("--") + 2 :]
        tokens = tokens[: tokens.index("--")]
        if tail:
          commands.append((tail[0], tail[1:]))
      commands.append((module, tokens))
  return commands


def _all_commands() -> list[tuple[str, str, list[str]]]:
  return [
    (os.path.relpath(page, ROOT), module, tokens) for page in PAGES for module, tokens in documented_commands(page)
  ]


def _flags_of(tokens: list[str]) -> list[str]:
  return [token[2:].split("=")[0] for token in tokens if token.startswith("--") and len(token) > 2]


def _subcommand(tokens: list[str]) -> str:
  """The sub-command a command names first (`retrieve text ...`, `moments train ...`), or ""."""
  return tokens[0] if tokens and re.fullmatch(r"[a-z][a-z-]*", tokens[0]) else ""


# Runs a module as `python -m` does, with --helpfull (absl's every flag, those of imported modules too); a module
# that does not know it (argparse) runs again in the same process with --help, its imports already loaded.
_HELP_SCRIPT = """
import contextlib, io, runpy, sys
module, subcommand = sys.argv[1:]
def run(flag):
  sys.argv = [module, *([subcommand] if subcommand else []), flag]
  out = io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    try:
      runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit:
      pass
  return out.getvalue()
text = run("--helpfull")
print(text if "--helpfull" in text else run("--help"))
"""


def _help_text(module_and_subcommand: tuple[str, str]) -> str:
  """What `python -m module [subcommand] --help` prints; absl modules' `--helpfull` (every flag, those of imported
  modules too). One interpreter per module and sub-command."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  done = subprocess.run(
    [sys.executable, "-c", _HELP_SCRIPT, *module_and_subcommand],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  return done.stdout + done.stderr


def _config_keys(config_file: str) -> set[str]:
  """Every dotted key of a config file's get_config()."""
  spec = importlib.util.spec_from_file_location("documented_config", os.path.join(ROOT, config_file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)

  def walk(node, prefix):
    for key, value in node.items():
      yield prefix + key
      if hasattr(value, "items"):
        yield from walk(value, prefix + key + ".")

  get_config = getattr(module, "get_config", None) or module.get_base_config
  return set(walk(get_config(), ""))


def test_command_extraction_reads_code_blocks_inline_code_and_launcher_tails(tmp_path):
  page = tmp_path / "page.md"
  page.write_text(
    "Run `python -m atr_jax.zeroshot --workdir RUN` now.\n"
    "```bash\n"
    "python -m atr_jax.main --config configs/demo.py \\\n"
    "    --workdir runs/x  # a comment --not_a_flag\n"
    "python -m scripts.launch_local --num_processes 2 -- -m atr_jax.main --workdir y [--verbosity=1]\n"
    "```\n"
  )
  assert documented_commands(str(page)) == [
    ("atr_jax.zeroshot", ["--workdir", "RUN"]),
    ("atr_jax.main", ["--config", "configs/demo.py", "--workdir", "runs/x"]),
    ("atr_jax.main", ["--workdir", "y", "--verbosity=1"]),
    ("scripts.launch_local", ["--num_processes", "2"]),
  ]


def test_docs_exist_and_each_page_opens_with_what_it_covers():
  assert len(PAGES) > 1
  for page in PAGES[1:]:
    with open(page, encoding="utf-8") as f:
      lines = [line for line in f.read().splitlines() if line.strip()]
    assert lines[0].startswith("# "), page
    assert lines[1].startswith("What this page covers:"), page


def test_every_documented_module_exists():
  commands = _all_commands()
  assert len(commands) > 20
  missing = sorted(
    {
      (page, module)
      for page, module, _ in commands
      if module not in EXTERNAL_TOOLS and not importlib.util.find_spec(module)
    }
  )
  assert not missing, f"documented modules that do not exist: {missing}"


@pytest.mark.slow
def test_every_documented_flag_and_config_key_exists():
  commands = [c for c in _all_commands() if c[1].split(".")[0] in OUR_PACKAGES and _flags_of(c[2])]
  keys = sorted({(module, _subcommand(tokens)) for _, module, tokens in commands})
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    helps = dict(zip(keys, pool.map(_help_text, keys)))
  problems = []
  for page, module, tokens in commands:
    help_text = helps[(module, _subcommand(tokens))]
    known = set(_HELP_FLAG.findall(help_text))
    if not known:
      problems.append(f"{page}: python -m {module}: --help printed no flags: {help_text[-300:]}")
      continue
    config_file = tokens[tokens.index("--config") + 1] if "--config" in tokens else "configs/base.py"
    for flag in _flags_of(tokens):
      if flag.startswith("config."):
        path = config_file if config_file.endswith(".py") else "configs/base.py"
        if flag[len("config.") :] not in _config_keys(path):
          problems.append(f"{page}: python -m {module}: --{flag} is not a key of {path}")
      elif flag not in known and not (flag.startswith("no") and flag[2:] in known):
        problems.append(f"{page}: python -m {module}: --{flag} is not a flag of the module")
  assert not problems, "\n".join(problems)
