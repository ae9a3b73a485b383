"""Write-then-rename: a file written here is, after any kill, either its previous content (or absent) or its new
content, never half of it."""

import os
from typing import BinaryIO, Callable


def write_atomically(path: str, write: Callable[[BinaryIO], object]) -> None:
  """Calls `write(binary file)` on a temporary file beside `path`, then renames it to `path`."""
  partial = path + ".partial"
  with open(partial, "wb") as f:
    write(f)
  os.replace(partial, path)


def write_text_atomically(path: str, text: str) -> None:
  write_atomically(path, lambda f: f.write(text.encode("utf-8")))
