"""The starter plugin (tests/fixtures/splice_starter, the one docs/writing-a-plugin.md builds) passes the kit."""

import splice.testing


@splice.testing.parametrize(plugin="starter")
def test_conformance(case):
    case.run()


def test_pair():
    splice.testing.check_pair("starter_cnn", "starter_lm")
