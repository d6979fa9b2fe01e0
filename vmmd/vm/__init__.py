"""The VM layer: builds, runs and persists one microVM on top of vmmd.native."""
