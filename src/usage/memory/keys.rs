//! The in-memory store's keys: (customer, feature, window start) owned in the maps,
//! and probed with the request's borrowed strings, so a lookup allocates nothing and
//! only the first use of a key allocates it.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};

use crate::engine::UsageKey;

/// The maps' hasher: fast, and randomly seeded so keys chosen by clients cannot
/// collide on purpose.
pub(super) type Hasher_ = foldhash::fast::RandomState;

/// An owned usage key.
#[derive(Debug, Clone)]
pub struct Key {
    pub(super) customer: Box<str>,
    pub(super) feature: Box<str>,
    pub(super) window: i64,
}

/// A key as either owned or borrowed, so maps can be probed with `&str`s.
pub(super) trait KeyView {
    fn parts(&self) -> (&str, &str, i64);
}

impl KeyView for Key {
    fn parts(&self) -> (&str, &str, i64) {
        (&self.customer, &self.feature, self.window)
    }
}

impl KeyView for (UsageKey<'_>, i64) {
    fn parts(&self) -> (&str, &str, i64) {
        (self.0.customer, self.0.feature, self.1)
    }
}

impl Hash for dyn KeyView + '_ {
    fn hash<H: Hasher>(&self, h: &mut H) {
        let (c, f, w) = self.parts();
        c.hash(h);
        f.hash(h);
        w.hash(h);
    }
}

impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyView + '_ {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (self as &dyn KeyView).hash(h)
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for Key {}

impl<'a> Borrow<dyn KeyView + 'a> for Key {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

pub(super) fn owned(k: UsageKey<'_>, window: i64) -> Key {
    Key {
        customer: k.customer.into(),
        feature: k.feature.into(),
        window,
    }
}

/// The key the unit tests of the store's parts use.
#[cfg(test)]
pub(super) const KEY: UsageKey<'static> = UsageKey {
    customer: "acme",
    feature: "api.calls",
};
