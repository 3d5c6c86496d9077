"""One contract for every destination, run over a local folder, ``memory://`` and the loopback S3
server (fsspec's shared abstract tests are the model): what the executors rely on holds for each."""

from __future__ import annotations

import hashlib
import uuid

import pytest

from core.storage import Storage
from rewriter.exec.dest.base import Destination, ShardParts
from rewriter.exec.dest.destination import open_destination
from rewriter.exec.dest.local import LocalDestination
from rewriter.exec.dest.lock import STATE_DIR
from rewriter.exec.dest.objects import ObjectDestination, S3Destination

MiB = 1 << 20


class DestinationContract:
    """Subclasses give the ``dst`` fixture and what their backend is expected to be."""

    kind: type[Destination]
    zero_copy: bool
    takes_parts: bool
    #: Whether "is this shard done" reads the bytes back (a torn file under the final name is
    #: possible only where files are renamed into place).
    checks_bytes: bool
    #: Whether an output shows under its name only once committed. ``memory://`` shows it while
    #: it is written; a resumed run still rewrites it, since its size is not the journaled one.
    atomic: bool = True

    @pytest.fixture
    def dst(self) -> Destination:
        raise NotImplementedError

    @pytest.fixture
    def src(self, tmp_path) -> Storage:
        d = tmp_path / "src"
        d.mkdir()
        (d / "small.json").write_bytes(b'{"a": 1}\n')
        (d / "big.bin").write_bytes(bytes(range(256)) * (3 * MiB // 256 + 7))
        (d / "sub").mkdir()
        (d / "sub" / "chat.jinja").write_bytes(b"{{ messages }}")
        return Storage(str(d))

    def test_kind(self, dst):
        assert type(dst) is self.kind
        assert (dst.zero_copy, isinstance(dst, ShardParts)) == (self.zero_copy, self.takes_parts)

    def test_starts_empty_and_lists_what_is_published(self, dst):
        assert dst.list_files() == []
        dst.put_bytes("config.json", b"{}")
        dst.put_bytes("sub/dir/x.txt", b"x")
        assert dst.list_files() == ["config.json", "sub/dir/x.txt"]
        assert dst.read_all("sub/dir/x.txt") == b"x" and dst.exists("config.json")

    def test_put_bytes_replaces_whole(self, dst):
        dst.put_bytes("f", b"first, longer content")
        dst.put_bytes("f", b"second")
        assert dst.read_all("f") == b"second"

    def test_output_is_published_by_commit_with_its_hash(self, dst):
        data = [b"header", bytes(2 * MiB), b"\x01" * 1000]
        out = dst.create_output("model.safetensors", buffer_bytes=MiB)
        for chunk in data:
            out.write(chunk)
        assert out.pos == sum(map(len, data))
        assert dst.exists("model.safetensors") is not self.atomic
        digest = out.commit()
        whole = b"".join(data)
        assert digest == hashlib.sha256(whole).hexdigest() == dst.hash("model.safetensors", MiB)
        assert dst.read_all("model.safetensors") == whole

    def test_aborted_output_leaves_nothing(self, dst):
        out = dst.create_output("model.safetensors", buffer_bytes=MiB)
        out.write(bytes(6 * MiB))  # more than one upload part on S3
        out.abort()
        published = [f for f in dst.list_files() if not f.startswith(STATE_DIR + "/")]
        assert published == []

    def test_shard_done(self, dst):
        dst.put_bytes("s.safetensors", b"abcdef")
        good = hashlib.sha256(b"abcdef").hexdigest()
        assert dst.shard_done("s.safetensors", 6, good, MiB)
        assert not dst.shard_done("s.safetensors", 7, good, MiB)
        assert not dst.shard_done("missing.safetensors", 6, good, MiB)
        # Same size, other bytes: only a destination that renames files into place checks them.
        assert dst.shard_done("s.safetensors", 6, hashlib.sha256(b"xxxxxx").hexdigest(), MiB) is not self.checks_bytes

    def test_copy_small_file_small_and_chunked(self, dst, src):
        dst.copy_small_file(src, "small.json", MiB)
        dst.copy_small_file(src, "big.bin", MiB)  # larger than the buffer: copied in chunks
        dst.copy_small_file(src, "sub/chat.jinja", MiB, dst_name="templates/chat.jinja")
        for name, theirs in (("small.json", "small.json"), ("big.bin", "big.bin"),
                             ("templates/chat.jinja", "sub/chat.jinja")):
            assert dst.read_all(name) == src.read_all(theirs), name

    def test_remove_and_remove_state(self, dst):
        dst.put_bytes("a", b"1")
        dst.put_bytes(f"{STATE_DIR}/journal.json", b"{}")
        dst.remove("a")
        assert not dst.exists("a")
        dst.remove_state()
        assert dst.list_files() == []

    def test_a_shard_in_parts(self, dst):
        if not self.takes_parts:
            pytest.skip("this destination writes each shard whole")
        part_bytes = 5 * MiB  # the smallest multipart part
        data = bytes(range(256)) * (12 * MiB // 256) + b"tail"
        handle = dst.begin_parts("big.safetensors", len(data), "f" * 64)
        uploaded = []
        # Parts written out of order, as independent workers would.
        for start in sorted(range(0, len(data), part_bytes), reverse=True):
            out = dst.part_output("big.safetensors", handle, start, part_bytes)
            out.write(data[start:start + part_bytes])
            assert out.commit() == hashlib.sha256(data[start:start + part_bytes]).hexdigest()  # hashed as written
            uploaded += out.parts
        assert not dst.exists("big.safetensors")
        dst.commit_parts("big.safetensors", len(data), handle, uploaded, MiB)
        assert dst.read_all("big.safetensors") == data

    def test_aborting_parts_never_raises(self, dst):
        if not self.takes_parts:
            pytest.skip("this destination writes each shard whole")
        handle = dst.begin_parts("x.safetensors", 10, "0" * 64)
        dst.abort_parts("x.safetensors", handle)
        dst.abort_parts("x.safetensors", handle)  # twice: already gone
        assert not dst.exists("x.safetensors")


class TestLocal(DestinationContract):
    kind, zero_copy, takes_parts, checks_bytes = LocalDestination, True, True, True

    @pytest.fixture
    def dst(self, tmp_path) -> Destination:
        return open_destination(str(tmp_path / "out"))

    def test_folder_checks(self, tmp_path):
        (tmp_path / "file").write_text("x")
        from core.errors import ExecutionError

        with pytest.raises(ExecutionError, match="is a file, not a folder"):
            open_destination(str(tmp_path / "file")).check_folder()
        with pytest.raises(ExecutionError, match="which is a file"):
            open_destination(str(tmp_path / "file" / "below")).check_folder()
        fresh = open_destination(str(tmp_path / "new"))
        fresh.check_folder()
        assert fresh.is_new()


class TestMemory(DestinationContract):
    kind, zero_copy, takes_parts, checks_bytes = ObjectDestination, False, False, False
    atomic = False

    @pytest.fixture
    def dst(self) -> Destination:
        return open_destination(f"memory://dst-{uuid.uuid4().hex}")


@pytest.mark.s3
class TestS3(DestinationContract):
    kind, zero_copy, takes_parts, checks_bytes = S3Destination, False, True, False

    @pytest.fixture
    def dst(self, s3) -> Destination:
        bucket = f"dst-{uuid.uuid4().hex[:12]}"
        s3.make_bucket(bucket)
        return open_destination(f"s3://{bucket}/out", s3.options)


def test_every_destination_implements_the_whole_interface():
    """A few abstract methods every destination must have; parts are a capability of their own;
    nothing is left to raise NotImplementedError at run time."""
    from tests.conftest import REPO

    assert Destination.__abstractmethods__ == {"create_output", "put_bytes", "shard_done", "check_folder",
                                               "is_new", "clear_temporary", "drop_empty_state"}
    for kind in (LocalDestination, ObjectDestination, S3Destination):
        assert kind.__abstractmethods__ == frozenset(), kind
    assert [k.__name__ for k in (LocalDestination, ObjectDestination, S3Destination)
            if issubclass(k, ShardParts)] == ["LocalDestination", "S3Destination"]
    raising = [f.name for f in (REPO / "rewriter" / "exec" / "dest").glob("*.py") if "NotImplementedError" in f.read_text()]
    assert raising == []


def _attributes(path) -> set[str]:
    import ast

    return {n.attr for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute)}


def test_storage_kinds_are_known_only_to_storage_and_destinations():
    """The executors ask the destination; only storage.py holds the fsspec filesystem and only
    destination.py speaks S3."""
    from tests.conftest import REPO

    files = [f for pkg in ("core", "rewriter", "planners", "ray_jobs") for f in sorted((REPO / pkg).rglob("*.py"))]
    owners = {REPO / "core" / "storage.py", REPO / "rewriter" / "exec" / "dest" / "objects.py"}
    reaching = [str(f.relative_to(REPO)) for f in files if f not in owners and "fs" in _attributes(f)]
    assert reaching == []
    s3_calls = [str(f.relative_to(REPO)) for f in files if "call_s3" in f.read_text()]
    assert s3_calls == ["rewriter/exec/dest/objects.py"]
    runners = [REPO / "rewriter" / "exec" / n
               for n in ("run/executor.py", "dest/journal.py", "distributed/parts.py", "distributed/ray_executor.py")]
    assert [f.name for f in runners if "is_local" in _attributes(f)] == []
