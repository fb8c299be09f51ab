"""Detection, in the order it runs: `diff` (fingerprints, fresh vs stored) -> `plan` (what the
new snapshot holds, per scope, with the deletion `guard`) -> `changes` (the change events)."""
