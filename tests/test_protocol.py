"""The frame codec and request envelope (busd.protocol), without sockets."""

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from busd.protocol import (
    MAX_CHANNEL_LENGTH,
    ErrorCode,
    FrameDecoder,
    FrameEncoder,
    ProtocolError,
    encode_frame,
    error_reply,
    is_channel_name,
    ok_reply,
    parse_request,
)

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=10), msgpack_values, max_size=6))
def test_round_trip_of_any_map(message):
    decoder = FrameDecoder()
    frame = encode_frame(message)
    assert decoder.feed(frame) == [message]
    assert decoder.pending == 0


@given(
    st.lists(
        st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**64 - 1)),
        max_size=5,
    ),
    st.data(),
)
def test_frames_split_anywhere_come_out_whole_and_in_order(messages, data):
    stream = b"".join(encode_frame(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = FrameDecoder()
    out = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[start:cut])
        start = cut
    assert out == messages


@pytest.mark.parametrize("value", [2**64, object(), {1, 2}])
def test_values_without_a_msgpack_form_are_refused_by_the_sender(value):
    with pytest.raises(ProtocolError) as info:
        encode_frame({"message": value})
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert "cannot be encoded as msgpack" in info.value.message


def test_oversized_header_is_refused_before_the_body():
    decoder = FrameDecoder(max_frame=1024)
    with pytest.raises(ProtocolError) as info:
        decoder.feed(struct.pack(">I", 4 * 1024**3 - 1))
    assert info.value.code is ErrorCode.TOO_LARGE
    assert info.value.fatal
    assert "over the maximum of 1024 bytes" in info.value.message


def with_encoder(message, max_frame):
    """FrameEncoder, the hot paths' (and busctl.Client's) encode_frame."""
    return FrameEncoder(max_frame)(message)


@pytest.mark.parametrize("encode", [encode_frame, with_encoder])
def test_encode_refuses_what_the_peer_would_refuse(encode):
    body = msgpack.packb({"blob": b"x" * 2000})
    with pytest.raises(ProtocolError) as info:
        encode({"blob": b"x" * 2000}, max_frame=len(body) - 1)
    assert info.value.code is ErrorCode.TOO_LARGE
    assert info.value.message == (
        f"frame of {len(body)} bytes is over the maximum of {len(body) - 1} bytes"
    )
    # A frame of exactly the maximum is fine, and the decoder agrees.
    frame = encode({"blob": b"x" * 2000}, max_frame=len(body))
    assert FrameDecoder(max_frame=len(body)).feed(frame) == [{"blob": b"x" * 2000}]


def test_frame_encoder_keeps_bytes_and_strings_apart():
    message = {"bytes": b"\xff\x00", "text": "été", "nested": [b"a", "a"]}
    frame = FrameEncoder()(message)
    assert frame == encode_frame(message)
    assert FrameDecoder().feed(frame) == [message]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (msgpack.packb([1, 2]), "frame must hold a msgpack map, got list"),
        (msgpack.packb(7), "frame must hold a msgpack map, got int"),
        (b"\xc1", "frame is not valid msgpack ("),
        (b"\x92\x01", "frame is not valid msgpack ("),
        (b"\x81\xa1a\xa2\xff\xfe", "frame holds a string that is not valid UTF-8"),
        (b"\x91" * 5000 + b"\xc0", "frame is nested too deeply"),
        (
            msgpack.packb({}) + msgpack.packb({}),
            "frame holds more than one msgpack value",
        ),
        (msgpack.packb({1: 2}), "frame is not valid msgpack ("),
    ],
)
def test_bad_bodies_are_reported_in_place_and_decoding_goes_on(body, expected):
    decoder = FrameDecoder()
    good = encode_frame({"id": 2, "op": "ping"})
    out = decoder.feed(struct.pack(">I", len(body)) + body + good)
    assert len(out) == 2
    assert isinstance(out[0], ProtocolError)
    assert out[0].code is ErrorCode.BAD_REQUEST
    assert not out[0].fatal
    # The client reads this message in its bad_request answer.
    if expected.endswith("("):
        assert out[0].message.startswith(expected)
    else:
        assert out[0].message == expected
    assert out[1] == {"id": 2, "op": "ping"}


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_garbage_never_escapes_as_anything_but_protocol_error(garbage):
    decoder = FrameDecoder(max_frame=4096)
    try:
        out = decoder.feed(garbage)
    except ProtocolError as error:
        assert error.fatal and error.code is ErrorCode.TOO_LARGE
    else:
        assert all(isinstance(m, dict | ProtocolError) for m in out)


def test_parse_request_splits_envelope_and_arguments():
    assert parse_request({"id": 1, "op": "publish", "channel": "main"}) == (
        1,
        "publish",
        {"channel": "main"},
    )
    assert parse_request({"id": "abc", "op": "ping"}) == ("abc", "ping", {})
    # At most 64 characters each (docs/protocol.md): 64 is fine.
    assert parse_request({"id": "i" * 64, "op": "o" * 64}) == ("i" * 64, "o" * 64, {})


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"op": "ping"}, "'id' must be an integer or a string, got nothing"),
        ({"id": True, "op": "ping"}, "'id' must be an integer or a string, got bool"),
        ({"id": 1.5, "op": "ping"}, "got float"),
        ({"id": "x" * 65, "op": "ping"}, "longer than 64"),
        ({"id": 1}, "'op' must be a non-empty string, got nothing"),
        ({"id": 1, "op": ""}, "'op' must be a non-empty string"),
        ({"id": 1, "op": 3}, "got int"),
        ({"id": 1, "op": "o" * 65}, "'op' must be a non-empty string, got str"),
    ],
)
def test_parse_request_names_the_faulty_field(message, expected):
    with pytest.raises(ProtocolError) as info:
        parse_request(message)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert expected in info.value.message


def test_replies_have_the_documented_shape():
    assert ok_reply(3, {"pong": True}) == {
        "id": 3,
        "ok": True,
        "result": {"pong": True},
    }
    assert error_reply(4, ErrorCode.BUSY, "queue full") == {
        "id": 4,
        "ok": False,
        "error": {"code": "busy", "message": "queue full"},
    }


def test_oversized_header_is_refused_one_byte_over_the_maximum_only():
    body = msgpack.packb({"k": "v" * 20})
    frame = struct.pack(">I", len(body)) + body
    assert FrameDecoder(max_frame=len(body)).feed(frame) == [{"k": "v" * 20}]
    with pytest.raises(ProtocolError) as info:
        FrameDecoder(max_frame=len(body) - 1).feed(frame)
    assert info.value.code is ErrorCode.TOO_LARGE


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("m", True),
        ("main", True),
        ("orders.eu-west_2", True),
        ("x" * MAX_CHANNEL_LENGTH, True),
        ("", False),
        ("x" * (MAX_CHANNEL_LENGTH + 1), False),
        ("with space", False),
        ("caf\u00e9", False),
        (b"main", False),
        (None, False),
    ],
)
def test_channel_names_are_1_to_64_letters_digits_dashes_underscores_dots(name, valid):
    assert is_channel_name(name) is valid
