"""The ``fedlora`` command line: the front door that composes the library and the apps."""
