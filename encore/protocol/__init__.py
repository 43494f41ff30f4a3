"""What crosses the process boundaries P0 <-> P1 <-> P2, and nothing else.

``messages``  msgspec structs and their msgpack codec (no pickle on the wire)
``spawn``     starting a child process wired to a ZMQ socket pair; the readiness answer
``lifeline``  children exit when their parent is gone
``client``    ``EngineClient``: what the API server talks to (P0 -> P1)
``mp_client`` the engine as a child process of the API server
``executor``  ``Executor``: what the engine talks to (P1 -> P2); the worker as a child process
"""
