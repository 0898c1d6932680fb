#!/usr/bin/env python3
"""A Modbus peer that no one in this repository wrote: pymodbus, for the interop tests.

Two subcommands, both driven by a JSON *layout* file the Rust test writes:

``serve``
    Runs a pymodbus server (Modbus TCP, RTU over TCP, or RTU on a serial device such as one
    end of a socat pty pair) whose units hold the layout's values, encoded here with Python's
    ``struct`` from the documented byte-order rules, so the encoding is independent of the
    agent's Rust codec. Prints one line ``READY tcp <ip>:<port>`` or ``READY serial <path>``
    once it serves, then runs until killed.

``read``
    Connects to a Modbus TCP server with the pymodbus client, reads every entry of the layout
    and prints one JSON object ``{"<unit>/<name>": value}``, decoded here with ``struct`` (the
    independent read-back of the write tests).

Layout::

    {"units": {"1": [
        {"name": "f", "table": "holding_register", "address": 0,
         "type": "float32", "order": "CDAB", "value": 123456.0},
        {"name": "s", "table": "holding_register", "address": 8,
         "type": "string", "length": 3, "value": "Hi!"},
        {"name": "c", "table": "coil", "address": 2, "type": "bool", "value": true}
    ]}}

Types: bool (coil / discrete_input only), int16, uint16, int32, uint32, int64, uint64,
float32, float64, string (``length`` registers, 2 bytes each, high byte first, NUL padded).
Orders (``ABCD`` when absent): ``ABCD``/``ABCDEFGH``, ``BADC``/``BADCFEHG``,
``CDAB``/``GHEFCDAB``, ``DCBA``/``HGFEDCBA``: the big-endian bytes of the value,
then ``BADC`` swaps the two bytes of each register, ``CDAB`` reverses the order of the
registers, ``DCBA`` reverses all bytes.
"""

import argparse
import asyncio
import json
import struct
import sys

from pymodbus.datastore import (
    ModbusSequentialDataBlock,
    ModbusServerContext,
    ModbusSlaveContext,
)
from pymodbus.framer import FramerType

# struct format (big endian) of every numeric type.
FORMATS = {
    "int16": ">h",
    "uint16": ">H",
    "int32": ">i",
    "uint32": ">I",
    "int64": ">q",
    "uint64": ">Q",
    "float32": ">f",
    "float64": ">d",
}

ORDERS = {
    "ABCD": "ABCD",
    "ABCDEFGH": "ABCD",
    "BADC": "BADC",
    "BADCFEHG": "BADC",
    "CDAB": "CDAB",
    "GHEFCDAB": "CDAB",
    "DCBA": "DCBA",
    "HGFEDCBA": "DCBA",
}

TABLE_SIZE = 65536


def bytes_to_registers(data):
    return [(data[i] << 8) | data[i + 1] for i in range(0, len(data), 2)]


def registers_to_bytes(regs):
    out = bytearray()
    for r in regs:
        out += bytes([(r >> 8) & 0xFF, r & 0xFF])
    return bytes(out)


def order_of(entry):
    name = entry.get("order", "ABCD")
    if name not in ORDERS:
        raise SystemExit(f"unknown byte order {name!r} in {entry}")
    return ORDERS[name]


def to_wire(big_endian, order):
    """Big-endian bytes of a value -> the registers on the wire in `order`."""
    if order == "ABCD":
        return bytes_to_registers(big_endian)
    if order == "BADC":
        swapped = bytearray()
        for i in range(0, len(big_endian), 2):
            swapped += bytes([big_endian[i + 1], big_endian[i]])
        return bytes_to_registers(bytes(swapped))
    if order == "CDAB":
        return list(reversed(bytes_to_registers(big_endian)))
    if order == "DCBA":
        return bytes_to_registers(bytes(reversed(big_endian)))
    raise SystemExit(f"unknown order {order}")


def from_wire(regs, order):
    """The registers on the wire in `order` -> big-endian bytes of the value."""
    if order == "ABCD":
        return registers_to_bytes(regs)
    if order == "BADC":
        data = registers_to_bytes(regs)
        out = bytearray()
        for i in range(0, len(data), 2):
            out += bytes([data[i + 1], data[i]])
        return bytes(out)
    if order == "CDAB":
        return registers_to_bytes(list(reversed(regs)))
    if order == "DCBA":
        return bytes(reversed(registers_to_bytes(regs)))
    raise SystemExit(f"unknown order {order}")


def width(entry):
    kind = entry["type"]
    if kind == "bool":
        return 1
    if kind == "string":
        return int(entry["length"])
    return struct.calcsize(FORMATS[kind]) // 2


def encode(entry):
    """The registers (or [bit]) that hold entry["value"]."""
    kind = entry["type"]
    value = entry["value"]
    if kind == "bool":
        return [bool(value)]
    if kind == "string":
        data = value.encode("utf-8")
        size = 2 * int(entry["length"])
        if len(data) > size:
            raise SystemExit(f"string {value!r} longer than {size} bytes")
        return bytes_to_registers(data + b"\0" * (size - len(data)))
    fmt = FORMATS[kind]
    if kind.startswith("float"):
        value = float(value)
    else:
        value = int(value)
    return to_wire(struct.pack(fmt, value), order_of(entry))


def decode(entry, words):
    kind = entry["type"]
    if kind == "bool":
        return bool(words[0])
    if kind == "string":
        return registers_to_bytes(words).rstrip(b"\0 ").decode("utf-8", errors="replace")
    return struct.unpack(FORMATS[kind], from_wire(list(words), order_of(entry)))[0]


STORE_KEYS = {"coil": "co", "discrete_input": "di", "input_register": "ir", "holding_register": "hr"}


def build_context(layout):
    slaves = {}
    for unit, entries in layout["units"].items():
        tables = {key: [0] * TABLE_SIZE for key in STORE_KEYS.values()}
        for entry in entries:
            table = entry["table"]
            if table not in STORE_KEYS:
                raise SystemExit(f"unknown table {table!r}")
            if entry["type"] == "bool" and table in ("input_register", "holding_register"):
                raise SystemExit("a bool in a register table: give the whole register as uint16")
            words = encode(entry)
            start = int(entry["address"])
            tables[STORE_KEYS[table]][start : start + len(words)] = words
        # ModbusSlaveContext adds 1 to every protocol address before it looks the block up
        # (the 1-based "register number" convention), so a block starting at 1 maps
        # protocol offset n to values[n].
        blocks = {key: ModbusSequentialDataBlock(1, values) for key, values in tables.items()}
        slaves[int(unit)] = ModbusSlaveContext(**blocks)
    return ModbusServerContext(slaves=slaves, single=False)


async def serve(args, layout):
    from pymodbus.server import ModbusSerialServer, ModbusTcpServer

    context = build_context(layout)
    framer = FramerType.RTU if args.framer == "rtu" else FramerType.SOCKET
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        server = ModbusTcpServer(context, framer=framer, address=(host, int(port)))
        await server.serve_forever(background=True)
        if server.transport is None:
            raise SystemExit(f"cannot listen on {args.tcp}")
        ip, real_port = server.transport.sockets[0].getsockname()[:2]
        print(f"READY tcp {ip}:{real_port}", flush=True)
    else:
        server = ModbusSerialServer(
            context,
            framer=FramerType.RTU,
            port=args.serial,
            baudrate=args.baud,
            parity=args.parity,
            stopbits=args.stopbits,
            bytesize=args.bytesize,
        )
        await server.serve_forever(background=True)
        if server.transport is None:
            raise SystemExit(f"cannot open {args.serial}")
        print(f"READY serial {args.serial}", flush=True)
    await asyncio.Event().wait()


def read(args, layout):
    from pymodbus.client import ModbusTcpClient

    host, _, port = args.tcp.rpartition(":")
    client = ModbusTcpClient(host, port=int(port), timeout=3, retries=1)
    if not client.connect():
        raise SystemExit(f"cannot connect to {args.tcp}")
    out = {}
    try:
        for unit, entries in layout["units"].items():
            for entry in entries:
                start = int(entry["address"])
                count = width(entry)
                table = entry["table"]
                if table == "coil":
                    rr = client.read_coils(start, count=count, slave=int(unit))
                    words = None if rr.isError() else rr.bits[:count]
                elif table == "discrete_input":
                    rr = client.read_discrete_inputs(start, count=count, slave=int(unit))
                    words = None if rr.isError() else rr.bits[:count]
                elif table == "input_register":
                    rr = client.read_input_registers(start, count=count, slave=int(unit))
                    words = None if rr.isError() else rr.registers
                else:
                    rr = client.read_holding_registers(start, count=count, slave=int(unit))
                    words = None if rr.isError() else rr.registers
                if words is None:
                    raise SystemExit(f"reading {entry} from unit {unit} failed: {rr}")
                value = decode(entry, words)
                out[f"{unit}/{entry['name']}"] = {"value": value, "registers": [int(w) for w in words]}
    finally:
        client.close()
    print(json.dumps(out), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the layout")
    s.add_argument("--layout", required=True, help="JSON layout file")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", help="ip:port to listen on (port 0: any free port)")
    where.add_argument("--serial", help="serial device path (RTU)")
    s.add_argument("--framer", choices=["socket", "rtu"], default="socket", help="TCP framing")
    s.add_argument("--baud", type=int, default=19200)
    s.add_argument("--parity", choices=["N", "E", "O"], default="E")
    s.add_argument("--stopbits", type=int, choices=[1, 2], default=1)
    s.add_argument("--bytesize", type=int, choices=[7, 8], default=8)
    r = sub.add_parser("read", help="read the layout's entries from a server and print them as JSON")
    r.add_argument("--layout", required=True)
    r.add_argument("--tcp", required=True, help="ip:port of the server")
    args = parser.parse_args()
    with open(args.layout, encoding="utf-8") as f:
        layout = json.load(f)
    if args.command == "serve":
        asyncio.run(serve(args, layout))
    else:
        read(args, layout)


if __name__ == "__main__":
    sys.exit(main())
