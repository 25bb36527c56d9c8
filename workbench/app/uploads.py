"""Files in and out of a session: uploaded reference images in, copies in Gradio's cache out."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ..errors import StudyError
from ..files import atomic_write
from ..images import MAX_IMAGE_PIXELS, load_image


def normalize_reference(source: str | Path, folder: Path, field_name: str) -> Path:
    """Decode an upload (any mode, EXIF-rotated, alpha) into an 8-bit RGB PNG named by its content."""
    # bytes, not the path: messages then name the field, not a temp path the user never saw
    try:
        image = load_image(Path(source).read_bytes() if Path(source).is_file() else source, field=field_name)
    except StudyError as error:
        raise StudyError(upload_message(str(error), field_name)) from None
    folder.mkdir(parents=True, exist_ok=True)
    data = image.tobytes()
    digest = hashlib.sha256(f"{image.size}".encode() + data).hexdigest()[:16]
    path = folder / f"{digest}.png"
    if not path.exists():
        atomic_write(path, lambda partial: image.save(partial, format="PNG"))
    return path


def upload_message(message: str, field_name: str) -> str:
    """load_image's message for bytes, said about the named file and ending in what to do.

    'F: upload is not an image PIL can decode (cannot identify image file <_io.BytesIO ...>)'
    -> 'F is not an image PIL can decode: upload a PNG, JPEG or WebP file'
    """
    message = message.replace(f"{field_name}: upload is ", f"{field_name} is ", 1)
    message = re.sub(r" \(cannot identify image file <_io\.BytesIO object at 0x[0-9a-fA-F]+>\)", "", message)
    bomb = re.search(r"Image size \((\d+) pixels\) exceeds .*decompression bomb", message)
    if bomb:
        return (f"{field_name} is {int(bomb.group(1)) / 1e6:.0f} MP, far over the {MAX_IMAGE_PIXELS / 1e6:.0f} MP "
                "limit (refused unread as a possible decompression bomb): downscale it first")
    if "not an image" in message:
        message += ": upload a PNG, JPEG or WebP file"
    elif "corrupt or truncated" in message:
        message += ": re-save it as PNG or JPEG and upload it again"
    return message


def session_folder(uploads_dir: Path, session_hash: str) -> Path:
    """Where one session's uploads go: a folder named by a hash of its session id."""
    return uploads_dir / hashlib.sha256(str(session_hash).encode()).hexdigest()[:16]


def served_file(path: str | Path) -> str:
    """A copy of `path` in Gradio's cache, in a folder named by a salted hash of its bytes: what a client gets.

    Run folders are not among the app's allowed_paths, so a client fetches only the copies handed to
    its own session, never a run file by its path.
    """
    from gradio.processing_utils import save_file_to_cache
    from gradio.utils import get_upload_folder

    return save_file_to_cache(path, get_upload_folder())
