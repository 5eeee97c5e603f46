"""Import-time version checks where the code relies on libraries' private internals."""

from __future__ import annotations

import pytest

from p2pfl.versions import UnsupportedVersion, require


def test_a_version_in_range_passes_and_is_returned() -> None:
    assert require("torch", at_least="2.2", below="2.15", why="x", installed="2.13.0+cpu") == (
        "2.13.0+cpu"
    )
    assert require("libp2p", at_least="0.8.1", below="0.8.2", why="x", installed="0.8.1")


@pytest.mark.parametrize("found", ["0.8.0", "0.8.2", "0.9.0rc1", "1.0"])
def test_a_version_out_of_range_fails_in_one_line_naming_it(found: str) -> None:
    with pytest.raises(UnsupportedVersion) as error:
        require("libp2p", at_least="0.8.1", below="0.8.2", why="p2pfl.transport._yamux",
                installed=found)  # fmt: skip
    message = str(error.value)
    assert "\n" not in message
    assert message == (
        "p2pfl.transport._yamux relies on libp2p internals: expected libp2p >= 0.8.1, "
        f"< 0.8.2, found {found}"
    )


def test_the_installed_libraries_pass_their_checks() -> None:
    import p2pfl.transport._yamux  # noqa: F401
    import sim.mixing  # noqa: F401
