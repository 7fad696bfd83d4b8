"""A multipart/form-data upload streamed to disk as it arrives: the `file` part goes chunk by
chunk into a `controlplane.files.Spool` (hashed, counted, refused past the upload limit), so a
500 MB upload never sits in memory. Litestar's own form parsing would spool the file to a
temporary file of its own and copy it again; and the app's 1 MiB body limit does not apply to
this route (it has its own: the platform setting `upload_max_bytes`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from multipart import MultipartSegment, ParserError, PushMultipartParser, parse_options_header

from controlplane.errors import InvalidInput
from controlplane.files import Spool, Spooled, spool_suffix, too_large

MAX_FIELD_BYTES = 64 << 10  # a text field (purpose): far more than any real value
MAX_PARTS = 16
FORM_OVERHEAD = 64 << 10  # multipart headers and boundaries around the file's bytes


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    spooled: Spooled | None = None


async def read_form(
    content_type: str | None,
    content_length: str | None,
    body: AsyncIterator[bytes],
    spool_dir: Path,
    limit: int,
) -> Form:
    """The form's text fields and its `file` part, spooled. InvalidInput for a body that is not
    multipart/form-data or is malformed; TooLarge past `limit` bytes of file."""
    kind, options = parse_options_header(content_type or "")
    if kind != "multipart/form-data" or not options.get("boundary"):
        raise InvalidInput(f"the body must be multipart/form-data with a boundary, not {kind!r}",
                           "file")  # fmt: skip
    if content_length and content_length.isdigit() and int(content_length) > limit + FORM_OVERHEAD:
        raise too_large(limit)
    form, spool = Form(), None
    text: bytearray | None = None
    try:
        with PushMultipartParser(options["boundary"], max_segment_count=MAX_PARTS) as parser:
            async for chunk in _chunks(body):
                for event in parser.parse(chunk):
                    if isinstance(event, MultipartSegment):
                        segment = event
                        if segment.name == "file" and segment.filename is not None:
                            if spool is not None:
                                raise InvalidInput("one file per upload", "file")
                            form.filename = segment.filename
                            spool = Spool(spool_dir, limit, spool_suffix(segment.filename))
                        else:
                            text = bytearray()
                    elif event is None:  # the end of a part
                        if text is not None:
                            form.fields[segment.name] = text.decode("utf-8", "replace")
                            text = None
                        elif spool is not None:
                            form.spooled = spool.close()
                    elif text is not None:
                        text += event
                        if len(text) > MAX_FIELD_BYTES:
                            raise InvalidInput(
                                f"form field {segment.name!r} exceeds {MAX_FIELD_BYTES} bytes",
                                segment.name,
                            )
                    elif spool is not None:
                        spool.write(bytes(event))
            if not parser.closed:
                raise InvalidInput("the multipart body ended early", "file")
    except ParserError as e:
        if spool is not None:
            spool.discard()
        raise InvalidInput(f"malformed multipart/form-data: {e}", "file") from None
    except BaseException:
        if spool is not None:
            spool.discard()
        raise
    if form.spooled is None:
        raise InvalidInput("the form has no file part named 'file'", "file")
    return form


async def _chunks(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for chunk in body:
        if chunk:
            yield chunk
    yield b""  # tells the parser the body ended
