"""generate --batch FILE.jsonl: lines of {"image": FILE or [FILES], "video": FILE or [FILES], "prompt": TEXT}
(an image, a video or both) in, one JSON line out per line in, in input order; a bad line becomes an error line
and the others still run. A relative file name is read from the batch file's folder, wherever the command runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read_batch_file(path) -> list:
    """(line number, (images, prompt, videos)) per non-empty line, or (line number, error message)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: batch file not found")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file; --batch takes JSON lines, one "
                         '{"image": FILE, "prompt": TEXT} per line') from None
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or \
                    not ("image" in item or "video" in item):
                raise ValueError('expected an object with "prompt" (text) and "image" or "video" (a file or a list '
                                 'of files)')
            folder = Path(path).parent
            out.append((number, (files(item, "image", folder), item["prompt"], files(item, "video", folder))))
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            out.append((number, f"{path}:{number}: {e}"))
    return out


def files(item: dict, key: str, folder: Path) -> list[Path]:
    """The files under `key` of a batch line ([] without the key), relative names under `folder`."""
    names = item.get(key, [])
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or (key in item and not names) or not all(isinstance(i, str) for i in names):
        raise ValueError(f'"{key}" must be a file name or a non-empty list of file names')
    return [folder / name for name in names]   # an absolute name stays as it is


def answer_file(path, batch_size: int, pipe, method, sampling) -> int:
    """Print one JSON line per input line of `path`, in input order; a bad line is an error line. Returns the
    exit status: 1 when a line failed."""
    from .image import load_image

    results, good = {}, []
    lines = read_batch_file(path)
    if not lines:
        raise ValueError(f"{path}: no lines to answer (the file is empty)")
    for number, item in lines:
        if isinstance(item, str):
            results[number] = {"line": number, "error": item}
            continue
        try:  # images, videos and prompt are checked one line at a time, so a bad one spoils no batch
            loaded = ([load_image(i) for i in item[0]], item[1], [pipe.read_video(v) for v in item[2]])
            pipe.inputs(*loaded)
            good.append((number, loaded))
        except (ValueError, OSError) as e:
            results[number] = {"line": number, "error": str(e)}
    for start in range(0, len(good), batch_size):
        chunk = good[start:start + batch_size]
        answers = pipe.answer_batch([item for _, item in chunk], prune=method, **sampling)
        results.update({number: {"line": number, **a.as_json()} for (number, _), a in zip(chunk, answers)})
    for number in sorted(results):
        print(json.dumps(results[number]))
    failed = sum("error" in r for r in results.values())
    if failed:
        print(f"error: {failed} of {len(results)} lines failed (see their JSON lines)", file=sys.stderr)
        return 1
    return 0
