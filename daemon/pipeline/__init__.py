"""The image pipeline: pure functions and small classes on numpy arrays.

Nothing in this package reads or writes files, touches the network or uses asyncio;
`daemon.frames` loads and writes, the service wires the stages together.
"""
