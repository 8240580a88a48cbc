"""The Batch API's HTTP routes, on the gateway's aiohttp app: `POST /v1/files` (purpose
`batch`), `GET /v1/files/{id}`, `GET /v1/files/{id}/content`, `POST /v1/batches`,
`GET /v1/batches`, `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`. Every change is
committed (an upload fsynced and renamed into place) before it is answered."""

from __future__ import annotations

import os
import time
from typing import Any

from aiohttp import BodyPartReader, web

from broker import openai_api as api
from broker.batch_lines import URLS
from broker.batch_store import Batch, Store, fsync_dir, new_id
from broker.batches import Batches
from broker.openai_api import ApiError

WINDOWS = ("24h",)  # OpenAI's only completion window; Baton runs a batch as soon as it can
MAX_LIST = 100


class BatchApi:
    def __init__(self, store: Store, batches: Batches, max_file_bytes: int) -> None:
        self.store = store
        self.batches = batches
        self.max_file_bytes = max_file_bytes

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/files", self.upload)
        app.router.add_get("/v1/files/{id}", self.file)
        app.router.add_get("/v1/files/{id}/content", self.content)
        app.router.add_post("/v1/batches", self.create)
        app.router.add_get("/v1/batches", self.list)
        app.router.add_get("/v1/batches/{id}", self.retrieve)
        app.router.add_post("/v1/batches/{id}/cancel", self.cancel)

    # --- files ---

    async def upload(self, request: web.Request) -> web.StreamResponse:
        """multipart/form-data with `purpose` and `file`, streamed to disk (never whole in
        memory); larger than gateway.max_file_bytes is refused with 413."""
        try:
            reader = await request.multipart()
        except (AssertionError, ValueError):  # aiohttp's way of saying "not multipart"
            raise api.bad("upload a file as multipart/form-data", "file") from None
        purpose, file_id, name, size = None, new_id("file-"), "", 0
        part_path = self.store.path(file_id + ".part")
        try:
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise api.bad("nested multipart bodies are not supported", "file")
                if part.name == "purpose":
                    purpose = (await part.text()).strip()
                elif part.name == "file":
                    name = part.filename or "upload.jsonl"
                    size = await self._save(part, part_path)
            if purpose != "batch":
                raise api.bad("'purpose' must be \"batch\" (the only purpose served)", "purpose")
            if not part_path.exists():
                raise api.bad("'file' is required", "file")
            os.replace(part_path, self.store.path(file_id))
            fsync_dir(self.store.files)
        finally:
            part_path.unlink(missing_ok=True)
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": size,
            "created_at": int(time.time()),
            "filename": name,
            "purpose": "batch",
            "status": "processed",
        }
        self.store.add_file(obj)
        return web.json_response(obj)

    async def _save(self, part: BodyPartReader, path: os.PathLike) -> int:
        size = 0
        with open(path, "wb") as f:
            while chunk := await part.read_chunk(1 << 16):
                size += len(chunk)
                if size > self.max_file_bytes:
                    raise ApiError(
                        413, f"the file is over gateway.max_file_bytes ({self.max_file_bytes})"
                    )
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        return size

    async def file(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._file(request.match_info["id"]))

    async def content(self, request: web.Request) -> web.StreamResponse:
        obj = self._file(request.match_info["id"])
        return web.FileResponse(
            self.store.path(obj["id"]), headers={"Content-Type": "application/jsonl"}
        )

    def _file(self, file_id: str) -> dict[str, Any]:
        obj = self.store.file(file_id)
        if obj is None:
            raise ApiError(404, f"no file {file_id!r}", param="file_id", code="file_not_found")
        return obj

    # --- batches ---

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = api.read_json(await request.read())
        input_file_id = body.get("input_file_id")
        if not isinstance(input_file_id, str) or not input_file_id:
            raise api.bad("'input_file_id' is required: a file uploaded for batch", "input_file_id")
        endpoint = body.get("endpoint")
        if endpoint not in URLS:
            raise api.bad(f"'endpoint' must be one of {', '.join(URLS)}", "endpoint")
        window = body.get("completion_window")
        if window not in WINDOWS:
            raise api.bad("'completion_window' must be \"24h\"", "completion_window")
        metadata = body.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):
            raise api.bad("'metadata' must be an object of strings", "metadata")
        obj = self.store.file(input_file_id)
        if obj is None:
            raise ApiError(
                404, f"no file {input_file_id!r}", param="input_file_id", code="file_not_found"
            )
        if obj["purpose"] != "batch":
            raise api.bad(f"file {input_file_id!r} was not uploaded for batch", "input_file_id")
        batch = Batch(
            new_id("batch_"),
            input_file_id,
            endpoint,
            window,
            int(time.time()),
            metadata,
            output_file=new_id("file-"),
            error_file=new_id("file-"),
        )
        self.store.save(batch)
        self.batches.launch(batch)
        return web.json_response(batch.api())

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._batch(request.match_info["id"]).api())

    async def list(self, request: web.Request) -> web.StreamResponse:
        after = request.query.get("after")
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            raise api.bad("'limit' must be an integer", "limit") from None
        if not 1 <= limit <= MAX_LIST:
            raise api.bad(f"'limit' must be from 1 to {MAX_LIST}", "limit")
        found, more = self.store.batches(after, limit)
        # a running batch's live object: its counts as of its last commit, like the row's
        data = [(self.batches.get(b.id) or b).api() for b in found]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": more,
            }
        )

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        batch = self._batch(request.match_info["id"])
        if batch.status in ("validating", "in_progress"):
            await self.batches.cancel(batch)
        elif batch.status not in ("cancelling", "cancelled"):
            raise ApiError(
                409,
                f"batch {batch.id} is {batch.status}: it cannot be cancelled",
                code="batch_not_cancellable",
            )
        return web.json_response(batch.api())

    def _batch(self, batch_id: str) -> Batch:
        batch = self.batches.get(batch_id)
        if batch is None:
            raise ApiError(404, f"no batch {batch_id!r}", param="batch_id", code="batch_not_found")
        return batch
