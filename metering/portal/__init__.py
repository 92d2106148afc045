"""Portal tokens and the usage pages' view of an organization (contract section 11)."""
