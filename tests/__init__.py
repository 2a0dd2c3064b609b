"""axolotl-mote test suite (a package: helpers import as tests.helpers.*)."""
