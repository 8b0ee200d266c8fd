"""Crafted checkpoint files that try to run code or change the process while they are read.

Each builder writes a file whose loading, by a plain unpickler, would act: call `os.system` (creating `marker`), or
replace `collections.Counter.update` for the rest of the process. The tests assert that reading them is refused,
that `marker` never appears and that `Counter` still counts.
"""

import os
import pickle
import struct

import torch


class SystemCall:
    """Unpickles as `os.system(command)`."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def system_call_at_top(path, marker, state_dict):
    torch.save({"model": state_dict, "payload": SystemCall(f"touch {marker}")}, path)
    return path


def system_call_inside_config(path, marker, state_dict):
    """The payload hidden in the yacs config that official checkpoints pickle beside the weights."""
    from yacs.config import CfgNode

    config = CfgNode({"DATA": CfgNode({"IMG_SIZE": 32})})
    dict.__setitem__(config["DATA"], "HOOK", SystemCall(f"touch {marker}"))  # past yacs' type check
    torch.save({"model": state_dict, "config": config}, path)
    return path


def _unicode(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


# {"counter": collections.Counter after BUILD (None, {"update": builtins.set})}: BUILD on the class object itself sets
# `Counter.update = set`, so that `Counter("aab")` returns an empty Counter afterwards. Both globals are on torch's
# weights_only allowlist; the attack is the BUILD on a class.
COUNTER_PAYLOAD = (
    b"\x80\x02}" + _unicode("counter") + b"ccollections\nCounter\nN}" + _unicode("update") + b"cbuiltins\nset\ns\x86bs."
)


def build_on_counter(path, marker=None, state_dict=None):
    """A legacy-format torch file (the format before zip) whose object pickle is `COUNTER_PAYLOAD`."""
    with open(path, "wb") as f:
        sys_info = dict(protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=4))
        for header in (0x1950A86A20F9469CFC6C, 1001, sys_info):  # torch's legacy magic number, protocol, sys info
            pickle.dump(header, f, protocol=2)
        f.write(COUNTER_PAYLOAD)
        pickle.dump([], f, protocol=2)  # no storages
    return path


CRAFTED = {"system_call": system_call_at_top, "inside_config": system_call_inside_config, "counter": build_on_counter}
