"""Chain data: record schema, formatting to ids, the Axolotl strategy and collators."""
