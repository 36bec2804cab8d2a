//! The customer table: every customer's compiled subscriptions, grants and overrides,
//! split into [`SHARDS`] shards by a hash of the customer id, each behind an `Arc`.
//!
//! Why shards: a snapshot is immutable and readers never lock, so a change to one
//! customer must publish a new table. Rebuilding one shard (1/4096 of the customers:
//! about 250 records at a million) and sharing the others by reference makes that
//! change cost microseconds instead of a full recompile, while a lookup stays one hash,
//! one shard pointer and one probe of a flat `hashbrown::HashTable<u32>`. 4,096 rather
//! than fewer, larger shards: a write allocates and frees a whole shard, and at 1,000
//! writes a second 256 shards of a million customers meant ~600 MB a second of
//! allocator churn whose purging stalled writes (`bash benches/write_load.sh`).
//!
//! Inside a shard the layout is flat (records, then the subscriptions, grants,
//! overrides and names they point into by offset), which keeps a customer near 150
//! bytes and a lookup to a few cache misses. Scopes are interned per shard.

use std::hash::BuildHasher;
use std::sync::Arc;

use compact_str::CompactString;
use hashbrown::HashTable;

use super::snapshot::{CustomerGrant, NONE, Override, Scope, ScopeId, Subscription};

/// log2 of the number of shards.
const SHARD_BITS: u32 = 12;
/// Number of shards; a power of two.
pub const SHARDS: usize = 1 << SHARD_BITS;
/// Bits of a customer index that hold its place inside its shard.
const LOCAL_BITS: u32 = 20;
/// Most customers one shard holds (1M: 4.3 billion in the table).
pub const MAX_PER_SHARD: usize = 1 << LOCAL_BITS;

/// The rarely-present parts of a customer, kept out of line.
#[derive(Debug, Clone, Copy)]
pub struct Extras {
    pub grants: (u32, u32),
    pub overrides: (u32, u32),
}

#[derive(Debug, Clone)]
pub struct CustomerRec {
    pub id: CompactString,
    /// Offset and length in `Shard::names`.
    pub name: (u32, u32),
    pub subs: (u32, u32),
    /// Index into `Shard::extras`, or `NONE`.
    pub extras: u32,
}

/// A customer as the engine reads it.
#[derive(Debug, Clone, Copy)]
pub struct CustomerView<'a> {
    /// The customer's place in the table ([`Customers::view`] takes it back).
    pub index: u32,
    pub id: &'a str,
    pub name: Option<&'a str>,
    pub subs: &'a [Subscription],
    pub grants: &'a [CustomerGrant],
    pub overrides: &'a [Override],
    scopes: &'a [Scope],
}

impl<'a> CustomerView<'a> {
    /// The scope a subscription or grant of this customer names.
    pub fn scope(&self, id: ScopeId) -> Option<&'a Scope> {
        self.scopes.get(id as usize)
    }
}

/// One shard: a flat table of customers and the index that finds them.
#[derive(Debug, Default, Clone)]
pub struct Shard {
    index: HashTable<u32>,
    records: Vec<CustomerRec>,
    subs: Vec<Subscription>,
    grants: Vec<CustomerGrant>,
    overrides: Vec<Override>,
    extras: Vec<Extras>,
    names: String,
    scopes: Vec<Scope>,
}

/// The parts of one compiled customer, as [`Shard::push`] takes them.
#[derive(Debug)]
pub(crate) struct Parts<'p> {
    pub id: &'p str,
    pub name: Option<&'p str>,
    pub subs: &'p [Subscription],
    pub grants: &'p [CustomerGrant],
    pub overrides: &'p [Override],
}

impl Shard {
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The place of the customer with this id (hash `h`) in the shard.
    pub(crate) fn find(&self, h: u64, id: &str) -> Option<u32> {
        self.index
            .find(h, |&i| self.records[i as usize].id == id)
            .copied()
    }

    pub(crate) fn reserve(&mut self, n: usize) {
        self.records.reserve_exact(n);
        self.subs.reserve(n * 2);
        self.index.reserve(n, |_| 0);
    }

    /// Gives back what was reserved beyond the shard's customers (a compile reserves
    /// for an even spread, and shards differ by a few percent).
    fn shrink_to_fit(&mut self) {
        self.records.shrink_to_fit();
        self.subs.shrink_to_fit();
        self.grants.shrink_to_fit();
        self.overrides.shrink_to_fit();
        self.extras.shrink_to_fit();
        self.names.shrink_to_fit();
    }

    /// Interns a scope, returning its id in this shard.
    pub(crate) fn intern_scope(&mut self, s: Scope) -> ScopeId {
        if let Some(i) = self.scopes.iter().position(|x| *x == s) {
            return i as ScopeId;
        }
        self.scopes.push(s);
        self.scopes.len() as ScopeId - 1
    }

    /// Appends a customer whose id is not in the shard yet (the caller checked with
    /// [`Shard::find`]); `h` is the id's hash from [`locate`].
    /// Scope ids in `parts` must already be this shard's.
    pub(crate) fn push(&mut self, h: u64, p: Parts<'_>) {
        let subs = append(&mut self.subs, p.subs);
        let extras = if p.grants.is_empty() && p.overrides.is_empty() {
            NONE
        } else {
            let grants = append(&mut self.grants, p.grants);
            let overrides = append(&mut self.overrides, p.overrides);
            self.extras.push(Extras { grants, overrides });
            self.extras.len() as u32 - 1
        };
        let name = match p.name {
            Some(n) if !n.is_empty() => {
                let off = self.names.len() as u32;
                self.names.push_str(n);
                (off, n.len() as u32)
            }
            _ => (0, 0),
        };
        let idx = self.records.len() as u32;
        self.records.push(CustomerRec {
            id: CompactString::from(p.id),
            name,
            subs,
            extras,
        });
        let records = &self.records;
        self.index
            .insert_unique(h, idx, |&i| locate(records[i as usize].id.as_str()).0);
    }

    /// Copies customer `local` of `from` (another shard) into this one, re-interning
    /// its scopes.
    fn copy_from(&mut self, from: &Shard, local: u32) {
        let v = from.view_local(local, 0);
        let mut subs = v.subs.to_vec();
        let mut grants = v.grants.to_vec();
        for s in &mut subs {
            s.scope = self.rescope(from, s.scope);
        }
        for g in &mut grants {
            g.scope = self.rescope(from, g.scope);
        }
        let (h, _) = locate(v.id);
        self.push(
            h,
            Parts {
                id: v.id,
                name: v.name,
                subs: &subs,
                grants: &grants,
                overrides: v.overrides,
            },
        );
    }

    fn rescope(&mut self, from: &Shard, id: ScopeId) -> ScopeId {
        match from.scopes.get(id as usize) {
            Some(s) => self.intern_scope(s.clone()),
            None => NONE,
        }
    }

    fn view_local(&self, local: u32, shard: usize) -> CustomerView<'_> {
        let r = &self.records[local as usize];
        let range = |(s, n): (u32, u32)| s as usize..(s + n) as usize;
        let (grants, overrides) = match self.extras.get(r.extras as usize) {
            Some(x) => (
                &self.grants[range(x.grants)],
                &self.overrides[range(x.overrides)],
            ),
            None => (&[][..], &[][..]),
        };
        CustomerView {
            index: ((shard as u32) << LOCAL_BITS) | local,
            id: &r.id,
            name: (r.name.1 > 0).then(|| &self.names[range(r.name)]),
            subs: &self.subs[range(r.subs)],
            grants,
            overrides,
            scopes: &self.scopes,
        }
    }
}

/// Appends `items` to `to`, returning their (offset, length).
fn append<T: Clone>(to: &mut Vec<T>, items: &[T]) -> (u32, u32) {
    let start = to.len() as u32;
    to.extend_from_slice(items);
    (start, items.len() as u32)
}

/// The hash customer ids are found by: fixed, so every table agrees.
fn hasher() -> foldhash::fast::FixedState {
    foldhash::fast::FixedState::default()
}

/// The id's hash and the shard it belongs in. The shard takes bits 32.. of the hash:
/// hashbrown uses the low bits for the bucket and the top seven as the tag, so the
/// customers of one shard still spread over its whole table.
#[inline]
pub(crate) fn locate(id: &str) -> (u64, usize) {
    let h = hasher().hash_one(id);
    (h, ((h >> 32) as usize) & (SHARDS - 1))
}

/// The shard a customer id belongs in.
pub fn shard_of(id: &str) -> usize {
    locate(id).1
}

/// All customers, sharded by id hash; cloning shares every shard.
#[derive(Debug, Clone)]
pub struct Customers {
    shards: Box<[Arc<Shard>]>,
    len: usize,
}

impl Default for Customers {
    fn default() -> Self {
        Customers::from_shards(
            std::iter::repeat_with(Shard::default)
                .take(SHARDS)
                .collect(),
        )
    }
}

impl Customers {
    /// A table from [`SHARDS`] shards, each customer in the shard [`locate`] chose.
    pub(crate) fn from_shards(mut shards: Vec<Shard>) -> Customers {
        debug_assert_eq!(shards.len(), SHARDS);
        for s in &mut shards {
            s.shrink_to_fit();
        }
        let len = shards.iter().map(Shard::len).sum();
        // Small tables leave most shards empty: they share one allocation.
        let empty = Arc::new(Shard::default());
        Customers {
            shards: shards
                .into_iter()
                .map(|s| {
                    if s.is_empty() {
                        empty.clone()
                    } else {
                        Arc::new(s)
                    }
                })
                .collect(),
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn get(&self, id: &str) -> Option<CustomerView<'_>> {
        let (h, s) = locate(id);
        let shard = &self.shards[s];
        let local = shard.find(h, id)?;
        Some(shard.view_local(local, s))
    }

    /// The customer at `index` (a [`CustomerView::index`] of this table).
    pub fn view(&self, index: u32) -> CustomerView<'_> {
        let s = (index >> LOCAL_BITS) as usize;
        self.shards[s].view_local(index & (MAX_PER_SHARD as u32 - 1), s)
    }

    /// Every customer, shard by shard (not in file order).
    pub fn iter(&self) -> impl Iterator<Item = CustomerView<'_>> {
        self.shards.iter().enumerate().flat_map(|(s, shard)| {
            (0..shard.records.len() as u32).map(move |i| shard.view_local(i, s))
        })
    }

    /// Every subscription of every customer.
    pub fn subscriptions(&self) -> impl Iterator<Item = &Subscription> {
        self.shards.iter().flat_map(|s| s.subs.iter())
    }

    /// Every override of every customer.
    pub fn overrides(&self) -> impl Iterator<Item = &Override> {
        self.shards.iter().flat_map(|s| s.overrides.iter())
    }

    /// A new table where the shards in `rebuilt` replace this table's, every other
    /// shard shared.
    pub(crate) fn with_shards(&self, rebuilt: Vec<(usize, Shard)>) -> Customers {
        let mut shards = self.shards.clone();
        let mut len = self.len;
        for (i, s) in rebuilt {
            len = len - shards[i].len() + s.len();
            shards[i] = Arc::new(s);
        }
        Customers { shards, len }
    }

    /// A copy of shard `s` without the customers `drop` names (ids of that shard),
    /// ready for changed records to be pushed.
    pub(crate) fn shard_without(&self, s: usize, drop: &[&str]) -> Shard {
        let from = &self.shards[s];
        let mut out = Shard::default();
        out.reserve(from.len());
        for (i, r) in from.records.iter().enumerate() {
            if !drop.contains(&r.id.as_str()) {
                out.copy_from(from, i as u32);
            }
        }
        out
    }

    /// Copies customer `id`, when this table has it, into `out` (the shard `id` belongs
    /// in, of another table over the same catalog).
    pub(crate) fn copy_into(&self, id: &str, out: &mut Shard) {
        let (h, s) = locate(id);
        let from = &self.shards[s];
        if let Some(local) = from.find(h, id) {
            out.copy_from(from, local);
        }
    }

    /// Shards shared with `other` (by pointer): how much of a change was rebuilt.
    pub fn shared_shards(&self, other: &Customers) -> usize {
        self.shards
            .iter()
            .zip(other.shards.iter())
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Timestamp;

    fn sub(plan: u32) -> Subscription {
        Subscription {
            plan,
            quantity: 1,
            starts: Timestamp::MIN,
            ends: Timestamp::MAX,
            grace_ends: Timestamp::MAX,
            anchor: Timestamp::MIN,
            scope: NONE,
            trial: false,
        }
    }

    fn table(ids: &[&str]) -> Customers {
        let mut shards: Vec<Shard> = (0..SHARDS).map(|_| Shard::default()).collect();
        for (n, id) in ids.iter().enumerate() {
            let (h, s) = locate(id);
            let subs = [sub(n as u32)];
            shards[s].push(
                h,
                Parts {
                    id,
                    name: None,
                    subs: &subs,
                    grants: &[],
                    overrides: &[],
                },
            );
        }
        Customers::from_shards(shards)
    }

    #[test]
    fn finds_every_customer_and_views_round_trip() {
        let ids: Vec<String> = (0..5_000).map(|i| format!("c{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let t = table(&refs);
        assert_eq!(t.len(), 5_000);
        for (n, id) in refs.iter().enumerate() {
            let v = t.get(id).unwrap();
            assert_eq!(v.id, *id);
            assert_eq!(v.subs[0].plan, n as u32);
            assert_eq!(t.view(v.index).id, *id);
        }
        assert!(t.get("nobody").is_none());
        assert_eq!(t.iter().count(), 5_000);
    }

    #[test]
    fn rebuilding_one_shard_shares_the_others() {
        let t = table(&["a", "b", "c", "d"]);
        let (h, s) = locate("b");
        let mut shard = t.shard_without(s, &["b"]);
        assert!(shard.find(h, "b").is_none());
        let subs = [sub(99)];
        shard.push(
            h,
            Parts {
                id: "b",
                name: Some("Bee"),
                subs: &subs,
                grants: &[],
                overrides: &[],
            },
        );
        let u = t.with_shards(vec![(s, shard)]);
        assert_eq!(u.shared_shards(&t), SHARDS - 1);
        assert_eq!(u.get("b").unwrap().subs[0].plan, 99);
        assert_eq!(u.get("b").unwrap().name, Some("Bee"));
        assert_eq!(
            t.get("b").unwrap().subs[0].plan,
            1,
            "the old table is unchanged"
        );
        assert_eq!(u.get("a").unwrap().subs[0].plan, 0);
        assert_eq!(u.len(), 4);
    }
}
