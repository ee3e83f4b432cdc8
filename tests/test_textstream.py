from edgellm.textstream import TextAssembler


def test_multibyte_characters_are_never_split():
    t = TextAssembler()
    data = "héllo 🌍".encode()
    out = "".join(t.push(data[i:i + 1]) for i in range(len(data))) + t.flush()
    assert out == "héllo 🌍"


def test_stop_string_across_pieces_is_held_back_and_cut():
    t = TextAssembler(["</end>"])
    shown = [t.push(p.encode()) for p in ["abc <", "/en", "d> more"]]
    assert "".join(shown) == "abc " and t.stopped and t.text == "abc "


def test_false_alarm_is_released():
    t = TextAssembler(["STOP"])
    assert t.push(b"ST") == ""
    assert t.push(b"ay") == "STay"
    assert t.flush() == "" and not t.stopped
