"""Write-then-rename: a file or folder written here is, after any kill, either its previous content (or absent) or
its new content, never half of it."""

import os
import shutil
from typing import IO, Callable


def write_atomically(path: str, write: Callable[[IO], object], *, text: bool = False) -> None:
  """Calls `write(file)` on a temporary file beside `path` (binary, or UTF-8 text with newline="" when `text`), then
  renames it to `path`."""
  partial = path + ".partial"
  with open(partial, "w", newline="", encoding="utf-8") if text else open(partial, "wb") as f:
    write(f)
  os.replace(partial, path)


def write_text_atomically(path: str, text: str) -> None:
  write_atomically(path, lambda f: f.write(text), text=True)


def write_folder_atomically(path: str, write: Callable[[str], object]) -> None:
  """Calls `write(temporary folder)` on an empty folder beside `path`, then puts it in place of `path` (a folder
  there before is kept until the new one is in place, then deleted)."""
  partial, replaced = path.rstrip("/") + ".writing", path.rstrip("/") + ".replaced"
  shutil.rmtree(partial, ignore_errors=True)  # What a killed call left.
  os.makedirs(partial)
  write(partial)
  if os.path.isdir(path):
    shutil.rmtree(replaced, ignore_errors=True)
    os.replace(path, replaced)
    os.replace(partial, path)
    shutil.rmtree(replaced)
  else:
    os.replace(partial, path)
