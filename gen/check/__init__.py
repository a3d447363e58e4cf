"""Checks that a build works on the machine it runs on: ahead-of-time kernel compiles, a prepared GPU check."""
