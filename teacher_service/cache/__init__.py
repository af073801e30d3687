"""A crash-safe, self-verifying zarr v3 cache of member logits, keyed by input-row content hashes.

The service computes a member's logits for an input row once and stores them here under the row's key (blake2b-128 of
the row's bytes, shared.hashing.row_keys); a later request for the same row, from any trainer, is answered from the
store instead of a forward pass.

Terms:

- namespace  one member version's rows in one row format: a zarr group named `<version>` (float32), `<version>.float16`
             or `<version>.top<k>` (row_formats.namespace_name), so versions and formats never mix
- row        a key, its stored logits and its checksum, at one position of the namespace's three arrays (layout)
- chunk      `chunk_rows` consecutive rows: the unit written, committed, read back and evicted
- committed  `committed_rows`, a namespace attribute: the rows below it are visible; nothing past it is ever read
- tail       the chunk being filled, held in memory (flushed padded, and rewritten whole once it fills)
- line       a slot of the bounded in-memory table of chunks read back to serve hits (lines)

Importing this package loads nothing: import the module you need. `settings`, `row_formats` and `location` are light
(the config and the registry import them); the others load numpy and zarr. To read the code, start with `store`
(what the service opens), then `member` (`get`, `insert` and the writer), then `reads`.

Modules:

- settings     CacheSettings, the store-wide settings, and the defaults the config takes
- layout       what the store holds (groups, arrays, attributes) and the names it writes
- row_formats  how a member's row is stored: float32, float16, top-k; a version's namespace for each
- rows         rows in memory, a row's bytes, its checksum
- store        LogitCache: the store root, one namespace per member version, one writer, one size budget
- member       MemberCache: one namespace's append log, inserts and writes, and `get`
- reads        committed chunks read back to serve hits, each row checked before it is served
- lines        ChunkLines: the chunks a namespace holds in memory, bounded
- chunk_files  rows read alone by byte range from a local folder's raw chunk files
- key_index    the file-backed row index by key
- budget       the size bound shared by every namespace, and a store out of disk space
- durable      what is fsynced, and in which order, with `durable`
- verify       a namespace's metadata and rows checked, read-only
- aside        start-up: damaged namespaces and root metadata set aside, sound rows salvaged
- location     what `[server.cache] dir` names: a real local folder, or a store URL
- folder_lock  one writer per local folder: a kernel lock
- slots        replicas of one config, each claiming a `replica-<i>` folder
- tools        `akd cache`: stats, verify, gc

Invariants. Rows form an append-only log (layout): the key index maps a key to its newest row, and a whole chunk,
once committed, is never rewritten (eviction deletes it, and its space is never reused). Crash safety rests on three
rules: one writer thread; rows are buffered and written as whole chunks (each chunk write replaces one object
atomically, as zarr's LocalStore and object stores do); and `committed_rows`, the only thing that makes rows visible,
is written after their data. A `kill -9` therefore loses at most the buffered rows, which are recomputable.

Nothing on the store is trusted: the cache is recomputable, so damage costs recomputation, never a wrong answer and
never a service that cannot start.

- Every row carries a checksum over its key, its logits and its namespace's name, so a flipped bit, a chunk read
  back as zeros (deleted), chunks swapped within or between namespaces, or a chunk that no longer decompresses all
  fail. Rows are verified when a namespace is loaded, and again, with their key, whenever they are read back from
  the store: a row read alone is checked each time it is read (against the checksum its key index holds), a row of a
  chunk read whole the first time it is served from that chunk's line. A chunk damaged while the service runs costs
  its rows a recomputation too (`MemberCache.get`).
- What fails its checks at start-up is set aside and rebuilt (aside): empty where the metadata fails, from the rows
  that verified where rows fail. Each case is logged and counted (`akd_cache_damaged_rows_total`,
  `akd_cache_damaged_namespaces_total`).
- With `durable`, a local folder's writes are fsynced before `committed_rows` is written, and the attributes file
  after (durable): a power loss then loses at most the buffered rows too. Without it, a power loss may leave torn or
  empty chunk files, which the checks above catch. Other stores rely on their own durability.
- A write that fails for lack of space (ENOSPC, EDQUOT) marks the size budget full: rows are still served, no longer
  stored, until a restart.

Size: past `max_bytes`, the least recently used whole chunks of the served namespaces are evicted, or inserts stop
(`when_full`). Memory does not grow with the store: the key index lives in a file-backed table (key_index), and hits
are read back from the store through a bounded table of chunks (`ChunkLines`, `memory_bytes` per namespace). Chunks
are written raw (no compressor: hashes and checksums do not compress, logits little), so a row can be read alone by
byte range from a local folder's chunk files; namespaces written compressed by earlier releases are still read whole
through zarr. Only the chunk being filled and the chunks not yet committed are held otherwise.

All reads and inserts happen on the one thread that owns the cache (the inference thread with one device, a shared
cache thread with several: service.py); the writer thread is the only one that writes the store after start-up, and
the owning thread reads committed chunks only.
"""
