"""The tier data plane that runs in the worker (P2): the bytes of the KV tiers.

P1 decides (``encore.kvmanager.tiered``); this package moves. One file per thing moved:

``blocks``       the device KV pool seen as whole blocks: gather, scatter, events, bytes
``codec``        how the lower tiers hold a block: its own bytes, or int8/int4 (KVQuant's split)
``host_pool``    the host tier's pinned tensors (one per layer group)
``host_copies``  device <-> host copies, issued a layer group ahead of the forward pass
``disk_files``   the disk tier's file format (header, checksum, atomic writes, start-up scan)
``disk_io``      device/host <-> disk transfers on I/O threads
``remote_io``    device <-> a Valkey/Redis store (the fleet's shared tier), probes, backoff
``frames``       a block's authenticated bytes, as disk files and remote values hold them
``io_time``      what overlapping transfers on a tier's I/O threads are charged (its throughput)
``data_plane``   one step's tier ops in their documented order; completions as ``KVDone``
"""
