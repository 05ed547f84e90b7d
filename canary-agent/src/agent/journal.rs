//! The service-map writes of one apply, kept so that a failed apply leaves the kernel
//! as it found it.

use anyhow::Result;

use super::desired;
use crate::{
    datapath::{Dataplane, ServiceEntry},
    policy::Policy,
};

/// A service being applied: its config, the plan's decision, its policy and map key.
pub(super) type Applying = (
    crate::config::ServiceConfig,
    desired::ServicePlan,
    Option<Policy>,
    canary_common::ServiceKey,
);

/// The service-map writes of one apply, with what each key held before, so that a
/// failed apply puts the map back as it was.
pub(super) struct Journal {
    before: Vec<(canary_common::ServiceKey, ServiceEntry)>,
    written: Vec<canary_common::ServiceKey>,
}

impl Journal {
    pub(super) fn new(installed: &[(canary_common::ServiceKey, ServiceEntry)]) -> Self {
        Self {
            before: installed.to_vec(),
            written: Vec::new(),
        }
    }

    pub(super) fn install(
        &mut self,
        dp: &mut dyn Dataplane,
        key: &canary_common::ServiceKey,
        entry: &ServiceEntry,
    ) -> Result<()> {
        dp.install(key, entry)?;
        self.written.push(*key);
        Ok(())
    }

    pub(super) fn uninstall(
        &mut self,
        dp: &mut dyn Dataplane,
        key: &canary_common::ServiceKey,
    ) -> Result<()> {
        dp.uninstall(key)?;
        self.written.push(*key);
        Ok(())
    }

    /// Restores every key written, newest first. Best effort: a kernel that refused one
    /// write may refuse the undo too, and that is logged.
    pub(super) fn undo(self, dp: &mut dyn Dataplane) {
        for key in self.written.iter().rev() {
            let result = match self.before.iter().find(|(k, _)| k == key) {
                Some((_, entry)) => dp.install(key, entry),
                None => dp.uninstall(key),
            };
            if let Err(e) = result {
                tracing::error!(?key, error = %format!("{e:#}"), "undoing a failed apply");
            }
        }
    }
}
