//! Loaded inputs → compiled ruleset.

use crate::ruleset::Ruleset;
use crate::source::Loaded;

pub fn compile(loaded: &Loaded) -> Ruleset {
    Ruleset::new(loaded.files.clone(), loaded.policies.clone())
}
