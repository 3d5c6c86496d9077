"""Destinations in object stores (``memory://``, ``gs://``, ``s3://``…): an object appears whole
when its upload completes, so there is nothing to rename and nothing half-written to remove.
On S3 a large shard is one multipart upload whose parts several workers send.
"""

from __future__ import annotations

import logging
from typing import Any

from rewriter.exec.dest.base import Destination, ShardParts
from rewriter.exec.io import Output, RemoteOutput
from rewriter.exec.io.partoutputs import MultipartPart, PartBody, PartOutput

log = logging.getLogger(__name__)


class ObjectDestination(Destination):
    def _open_options(self, buffer_bytes: int) -> dict[str, Any]:
        return {}

    def create_output(self, name: str, buffer_bytes: int, hash_trailing: bool = False) -> Output:
        return RemoteOutput(self.storage, name, self._open_options(buffer_bytes))

    def put_bytes(self, name: str, data: bytes) -> None:
        self.storage.pipe(name, data)

    def shard_done(self, name: str, size: object, sha256: object, buffer_bytes: int) -> bool:
        # Object stores publish only complete uploads: an object of the right size is the shard.
        return self.exists(name) and self.storage.size(name) == size

    # An object store has no folder to create or check, and no temporary names to tidy.
    def check_folder(self) -> None:
        return None

    def is_new(self) -> bool:
        return False

    def clear_temporary(self) -> None:
        return None

    def drop_empty_state(self, created: bool) -> None:
        return None


class S3Destination(ObjectDestination, ShardParts):
    def _open_options(self, buffer_bytes: int) -> dict[str, Any]:
        return {"block_size": max(buffer_bytes, 5 << 20)}  # S3's smallest multipart part

    def _s3(self, op: str, name: str, **kwargs: Any) -> Any:
        fs = self.storage.fs
        bucket, key, _ = fs.split_path(self.storage.path(name))
        return fs.call_s3(op, Bucket=bucket, Key=key, **kwargs)

    def begin_parts(self, name: str, size: int, plan_digest: str) -> str:
        """Start the shard's multipart upload; returns its upload id."""
        return str(self._s3("create_multipart_upload", name)["UploadId"])

    def part_output(self, name: str, handle: str, start: int, upload_part_bytes: int) -> PartOutput | MultipartPart:
        def send(number: int, body: PartBody) -> dict[str, Any]:
            r = self._s3("upload_part", name, UploadId=handle, PartNumber=number, Body=body)
            return {"PartNumber": number, "ETag": r["ETag"]}

        return MultipartPart(send, start, upload_part_bytes)

    def commit_parts(self, name: str, size: int, handle: str, uploaded: list[dict[str, Any]],
                     buffer_bytes: int, drop_cache: bool = False) -> None:
        """Complete the upload: the object appears whole (each writer hashed its part)."""
        self._s3("complete_multipart_upload", name, UploadId=handle,
                 MultipartUpload={"Parts": sorted(uploaded, key=lambda p: p["PartNumber"])})
        self.storage.invalidate_cache()

    def abort_parts(self, name: str, handle: str) -> None:
        try:
            self._s3("abort_multipart_upload", name, UploadId=handle)
        except Exception as e:  # an unfinished upload never becomes an object; the error being handled matters more
            log.warning("could not abort multipart upload %s of %s (%s: %s); the object store may keep "
                        "its parts until its lifecycle rules remove them", handle, self.describe(name),
                        type(e).__name__, e)

    def parts_kept(self, name: str, handle: str, size: int) -> dict[int, str] | None:
        try:
            got = self._s3("list_parts", name, UploadId=handle, MaxParts=10000).get("Parts", [])
        except Exception:  # the upload was completed or aborted since
            return None
        return {int(p["PartNumber"]): str(p["ETag"]) for p in got}

    def leftover_parts(self) -> list[tuple[str, str]]:
        """Every open multipart upload below the destination: parts, or s3fs uploads of whole shards."""
        bucket, prefix, _ = self.storage.fs.split_path(self.storage.path("x"))
        prefix, out, marks = prefix[:-1], [], {}  # type: ignore[var-annotated]
        while True:
            page = self.storage.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **marks)
            out += [(u["Key"][len(prefix):], u["UploadId"]) for u in page.get("Uploads", [])]
            if not page.get("IsTruncated"):
                return out
            marks = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def parts_done(self, name: str, size: object, parts: list[Any], buffer_bytes: int) -> bool:
        # A completed upload is the whole object: its size is the check.
        return self.shard_done(name, size, None, buffer_bytes)

    def part_sha256(self, handle: str, start: int, length: int, buffer_bytes: int) -> str | None:
        return None  # the parts of an open upload cannot be read back
