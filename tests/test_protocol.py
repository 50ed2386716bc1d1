"""The frame codec and request envelope (busd.protocol), without sockets."""

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from busd.protocol import (
    ErrorCode,
    FrameDecoder,
    ProtocolError,
    encode_frame,
    error_reply,
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


def test_encode_refuses_what_the_peer_would_refuse():
    with pytest.raises(ProtocolError) as info:
        encode_frame({"blob": b"x" * 2000}, max_frame=1024)
    assert info.value.code is ErrorCode.TOO_LARGE


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (msgpack.packb([1, 2]), "must hold a msgpack map, got list"),
        (msgpack.packb(7), "must hold a msgpack map, got int"),
        (b"\xc1", "not valid msgpack"),
        (b"\x92\x01", "not valid msgpack"),
        (b"\x81\xa1a\xa2\xff\xfe", "not valid UTF-8"),
        (b"\x91" * 5000 + b"\xc0", "nested too deeply"),
        (msgpack.packb({}) + msgpack.packb({}), "more than one msgpack value"),
        (msgpack.packb({1: 2}), "not valid msgpack"),
    ],
)
def test_bad_bodies_are_reported_in_place_and_decoding_goes_on(body, expected):
    decoder = FrameDecoder()
    good = encode_frame({"id": 2, "op": "ping"})
    out = decoder.feed(struct.pack(">I", len(body)) + body + good)
    assert len(out) == 2
    assert isinstance(out[0], ProtocolError)
    assert out[0].code is ErrorCode.BAD_REQUEST
    assert expected in out[0].message
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
