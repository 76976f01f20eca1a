"""Root conftest: closed-network defaults for every test and the real-server fixtures."""

pytest_plugins = ["tests.fixtures.servers", "tests.fixtures.orthanc", "tests.fixtures.postgres"]
