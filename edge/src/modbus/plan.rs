//! Read planning: which Modbus reads fetch a set of tags of one device.
//!
//! # Invariants of a plan
//!
//! - Every plannable tag asked for is in exactly one request, whole (a tag is never split
//!   across two requests); asking for a tag twice plans it once.
//! - A request covers one table and at most `max_registers_per_read` registers (capped at the
//!   protocol limit of 125) or `max_bits_per_read` bits (capped at 2000).
//! - Tags of one table are merged, in address order, while the gap of unused registers between
//!   them is at most `max_gap` and the request stays within the limit. This greedy merge gives
//!   the fewest requests for those constraints.
//! - Requests of one table never overlap, so no register is read twice in one cycle — with one
//!   unavoidable exception: two tags that overlap each other but together span more than the
//!   read limit (an odd config) are read by two requests that share registers.
//! - Tags whose range leaves the 16-bit address space, or that are wider than the read limit,
//!   or whose index is not a tag of the device, cannot be read; they are returned as
//!   [`Plan::rejected`] with a [`PlanError`] instead of panicking.
//! - The output is a pure function of the device and the set of tags asked for: deterministic.

use std::collections::BTreeMap;

use crate::model::{DeviceSpec, Table};

/// Most registers one read may fetch (Modbus function 3/4 limit).
pub const MAX_REGISTERS_PER_READ: u16 = 125;
/// Most bits one read may fetch (Modbus function 1/2 limit).
pub const MAX_BITS_PER_READ: u16 = 2000;

/// One Modbus read of a contiguous range in one table, and the tags it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    /// The table read.
    pub table: Table,
    /// First register (or bit) address.
    pub start: u16,
    /// Number of registers (or bits); at least 1.
    pub count: u16,
    /// The tags served: (index into `DeviceSpec::tags`, offset of the tag's first register or
    /// bit within this request), in address order.
    pub tags: Vec<(usize, u16)>,
}

/// Why a tag cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// The index is not a tag of the device.
    #[error("tag index {index} is not a tag of the device")]
    NoSuchTag {
        /// The index asked for.
        index: usize,
    },
    /// The tag's range runs past address 65535.
    #[error("tag at address {address} with width {width} runs past address 65535")]
    AddressOverflow {
        /// The tag's address.
        address: u16,
        /// The tag's width.
        width: u16,
    },
    /// The tag is wider than one read may fetch (or has width 0).
    #[error("tag width {width} does not fit one read of at most {limit}")]
    BadWidth {
        /// The tag's width.
        width: u16,
        /// The read limit of its table.
        limit: u16,
    },
}

/// The result of planning: the reads to make, and the tags that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// The reads, ordered by table then address.
    pub requests: Vec<ReadRequest>,
    /// Tags that cannot be read, with the reason, ordered by tag index.
    pub rejected: Vec<(usize, PlanError)>,
}

/// The width of a tag in registers or bits of its table (bools are one of either).
fn tag_width(device: &DeviceSpec, index: usize) -> Option<u16> {
    device.tags.get(index).map(|t| t.data_type.width())
}

/// The read limit of a table for a device: the configured one, within `1..=protocol limit`.
pub fn read_limit(device: &DeviceSpec, table: Table) -> u16 {
    if table.is_register() {
        device
            .max_registers_per_read
            .clamp(1, MAX_REGISTERS_PER_READ)
    } else {
        device.max_bits_per_read.clamp(1, MAX_BITS_PER_READ)
    }
}

/// Plans the reads of the given tags (indexes into `device.tags`); unplannable tags are
/// skipped. Use [`plan_with_rejects`] to learn which and why.
pub fn plan(device: &DeviceSpec, tags: impl IntoIterator<Item = usize>) -> Vec<ReadRequest> {
    plan_with_rejects(device, tags).requests
}

/// Plans the reads of the given tags (indexes into `device.tags`). See the module docs for the
/// invariants.
pub fn plan_with_rejects(device: &DeviceSpec, tags: impl IntoIterator<Item = usize>) -> Plan {
    let mut indexes: Vec<usize> = tags.into_iter().collect();
    indexes.sort_unstable();
    indexes.dedup();

    let mut rejected = Vec::new();
    // (address, width, index) per table; BTreeMap for a deterministic table order.
    let mut by_table: BTreeMap<Table, Vec<(u32, u32, usize)>> = BTreeMap::new();
    for index in indexes {
        let Some(tag) = device.tags.get(index) else {
            rejected.push((index, PlanError::NoSuchTag { index }));
            continue;
        };
        let width = tag.data_type.width();
        let limit = read_limit(device, tag.table);
        if width == 0 || width > limit {
            rejected.push((index, PlanError::BadWidth { width, limit }));
            continue;
        }
        if u32::from(tag.address) + u32::from(width) > 65536 {
            rejected.push((
                index,
                PlanError::AddressOverflow {
                    address: tag.address,
                    width,
                },
            ));
            continue;
        }
        by_table.entry(tag.table).or_default().push((
            u32::from(tag.address),
            u32::from(width),
            index,
        ));
    }

    let mut requests = Vec::new();
    for (table, mut spans) in by_table {
        spans.sort_unstable();
        let limit = u32::from(read_limit(device, table));
        let gap = u32::from(device.max_gap);
        // The request being built.
        let mut current: Option<Span> = None;
        for (address, width, index) in spans {
            let end = address + width;
            if let Some((start, cur_end, members)) = current.as_mut() {
                let new_end = end.max(*cur_end);
                if address <= *cur_end + gap && new_end - *start <= limit {
                    *cur_end = new_end;
                    members.push((index, address));
                    continue;
                }
            }
            if let Some(done) = current.take() {
                requests.push(finish(table, done));
            }
            current = Some((address, end, vec![(index, address)]));
        }
        if let Some(done) = current.take() {
            requests.push(finish(table, done));
        }
    }
    Plan { requests, rejected }
}

/// A request being built: start, end (exclusive), tags as (index, absolute address).
type Span = (u32, u32, Vec<(usize, u32)>);

/// Builds a request from a checked span. All values fit in u16: `start < 65536`,
/// `end - start <= 2000` and member addresses lie in `[start, end)`.
fn finish(table: Table, (start, end, members): Span) -> ReadRequest {
    let to16 = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
    ReadRequest {
        table,
        start: to16(start),
        count: to16(end - start),
        tags: members
            .into_iter()
            .map(|(index, address)| (index, to16(address - start)))
            .collect(),
    }
}

/// Splits a request in two halves by tags, each covering only its own tags, so that a device
/// answering "illegal data address" (exception 2) can be narrowed down to the tag at fault.
///
/// The split point falls between tags that start at different addresses (tags sharing a first
/// register stay together, as reading them separately would not isolate anything). Returns
/// `None` when the request cannot be split further (all its tags start at the same address).
pub fn split(device: &DeviceSpec, req: &ReadRequest) -> Option<(ReadRequest, ReadRequest)> {
    let n = req.tags.len();
    if n < 2 {
        return None;
    }
    let starts_differ = |i: usize| req.tags[i - 1].1 != req.tags[i].1;
    // The boundary nearest the middle where the start address changes.
    let mid = n / 2;
    let cut = (0..n)
        .flat_map(|d| [mid.checked_sub(d), mid.checked_add(d)])
        .flatten()
        .find(|&i| i >= 1 && i < n && starts_differ(i))?;
    let part = |tags: &[(usize, u16)]| -> Option<ReadRequest> {
        let start = u32::from(req.start) + u32::from(tags.first()?.1);
        let mut end = start;
        for &(index, offset) in tags {
            let width = u32::from(tag_width(device, index).unwrap_or(1).max(1));
            end = end.max(u32::from(req.start) + u32::from(offset) + width);
        }
        let to16 = |v: u32| u16::try_from(v).ok();
        let base = u32::from(req.start);
        Some(ReadRequest {
            table: req.table,
            start: to16(start)?,
            count: to16(end - start)?,
            tags: tags
                .iter()
                .map(|&(index, offset)| Some((index, to16(base + u32::from(offset) - start)?)))
                .collect::<Option<Vec<_>>>()?,
        })
    };
    Some((part(&req.tags[..cut])?, part(&req.tags[cut..])?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use edgesync_protocol::{DeviceId, PropertyId};
    use proptest::prelude::*;

    use super::*;
    use crate::model::{Access, ByteOrder, DataType, LinkSpec, ReportPolicy, TagSpec};

    fn tag(table: Table, address: u16, data_type: DataType) -> TagSpec {
        TagSpec {
            property: PropertyId::new(format!("p{address}")).unwrap(),
            table,
            address,
            data_type,
            bit: None,
            byte_order: ByteOrder::Abcd,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            access: Access::Read,
            poll_interval: Duration::from_secs(1),
            report: ReportPolicy::default(),
        }
    }

    fn device(tags: Vec<TagSpec>) -> DeviceSpec {
        DeviceSpec {
            id: DeviceId::new("d").unwrap(),
            link: LinkSpec::Tcp {
                endpoint: "127.0.0.1:502".into(),
            },
            unit_id: 1,
            timeout: Duration::from_secs(1),
            max_registers_per_read: 125,
            max_bits_per_read: 2000,
            max_gap: 0,
            tags,
        }
    }

    const HR: Table = Table::HoldingRegister;

    #[test]
    fn adjacent_tags_merge() {
        let d = device(vec![
            tag(HR, 10, DataType::UInt16),
            tag(HR, 11, DataType::Float32),
            tag(HR, 13, DataType::Int64),
        ]);
        let p = plan(&d, 0..3);
        assert_eq!(
            p,
            vec![ReadRequest {
                table: HR,
                start: 10,
                count: 7,
                tags: vec![(0, 0), (1, 1), (2, 3)],
            }]
        );
    }

    #[test]
    fn gaps_bridge_up_to_max_gap() {
        let mut d = device(vec![
            tag(HR, 0, DataType::UInt16),
            tag(HR, 4, DataType::UInt16),
        ]);
        d.max_gap = 2;
        assert_eq!(plan(&d, 0..2).len(), 2, "gap of 3 > 2");
        d.max_gap = 3;
        let p = plan(&d, 0..2);
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].start, p[0].count), (0, 5));
        assert_eq!(p[0].tags, vec![(0, 0), (1, 4)]);
    }

    #[test]
    fn limits_are_respected_and_tags_never_split() {
        let mut d = device((0..10).map(|i| tag(HR, i * 2, DataType::UInt32)).collect());
        d.max_registers_per_read = 5;
        let p = plan(&d, 0..10);
        // 2 tags (4 registers) per read; a third would need 6.
        assert_eq!(p.len(), 5);
        for r in &p {
            assert!(r.count <= 5);
            assert_eq!(r.count, 4);
        }
        // Configured limits above the protocol limits are capped.
        let mut d = device((0..200).map(|i| tag(HR, i, DataType::UInt16)).collect());
        d.max_registers_per_read = 1000;
        let p = plan(&d, 0..200);
        assert_eq!(p.iter().map(|r| r.count).collect::<Vec<_>>(), vec![125, 75]);
        let mut d = device(
            (0..3000)
                .map(|i| tag(Table::Coil, i, DataType::Bool))
                .collect(),
        );
        d.max_bits_per_read = u16::MAX;
        let p = plan(&d, 0..3000);
        assert_eq!(
            p.iter().map(|r| r.count).collect::<Vec<_>>(),
            vec![2000, 1000]
        );
    }

    #[test]
    fn overlapping_and_duplicate_tags_share_a_read() {
        let mut bit0 = tag(HR, 5, DataType::Bool);
        bit0.bit = Some(0);
        let mut bit7 = tag(HR, 5, DataType::Bool);
        bit7.bit = Some(7);
        let d = device(vec![
            tag(HR, 4, DataType::UInt32), // 4..6
            bit0,                         // 5
            bit7,                         // 5
            tag(HR, 5, DataType::UInt16), // 5
        ]);
        let p = plan(&d, [3, 2, 1, 0, 2, 2]);
        assert_eq!(
            p,
            vec![ReadRequest {
                table: HR,
                start: 4,
                count: 2,
                tags: vec![(0, 0), (1, 1), (2, 1), (3, 1)],
            }]
        );
    }

    #[test]
    fn tables_are_planned_separately() {
        let d = device(vec![
            tag(Table::Coil, 0, DataType::Bool),
            tag(Table::DiscreteInput, 1, DataType::Bool),
            tag(Table::InputRegister, 0, DataType::UInt16),
            tag(HR, 1, DataType::UInt16),
            tag(Table::Coil, 1, DataType::Bool),
        ]);
        let p = plan(&d, 0..5);
        let tables: Vec<_> = p.iter().map(|r| (r.table, r.start, r.count)).collect();
        assert_eq!(
            tables,
            vec![
                (Table::Coil, 0, 2),
                (Table::DiscreteInput, 1, 1),
                (Table::InputRegister, 0, 1),
                (HR, 1, 1),
            ]
        );
    }

    #[test]
    fn bad_tags_are_rejected_not_panicking() {
        let mut d = device(vec![
            tag(HR, 65535, DataType::UInt16),  // fits: the last register
            tag(HR, 65534, DataType::Float64), // runs past 65535
            tag(HR, 0, DataType::String { len: 200 }),
            tag(HR, 0, DataType::String { len: 0 }),
        ]);
        d.max_registers_per_read = 150; // capped at 125
        let p = plan_with_rejects(&d, [0, 1, 2, 3, 99]);
        assert_eq!(
            p.requests,
            vec![ReadRequest {
                table: HR,
                start: 65535,
                count: 1,
                tags: vec![(0, 0)]
            }]
        );
        assert_eq!(
            p.rejected,
            vec![
                (
                    1,
                    PlanError::AddressOverflow {
                        address: 65534,
                        width: 4
                    }
                ),
                (
                    2,
                    PlanError::BadWidth {
                        width: 200,
                        limit: 125
                    }
                ),
                (
                    3,
                    PlanError::BadWidth {
                        width: 0,
                        limit: 125
                    }
                ),
                (99, PlanError::NoSuchTag { index: 99 }),
            ]
        );
        // A limit of 0 is treated as 1.
        d.max_registers_per_read = 0;
        assert_eq!(read_limit(&d, HR), 1);
        assert_eq!(plan(&d, [0]).len(), 1);
    }

    #[test]
    fn split_narrows_to_single_tags() {
        let mut d = device((0..5).map(|i| tag(HR, i * 3, DataType::UInt32)).collect());
        d.max_gap = 10;
        let p = plan(&d, 0..5);
        assert_eq!(p.len(), 1);
        let (a, b) = split(&d, &p[0]).unwrap();
        assert_eq!(
            a,
            ReadRequest {
                table: HR,
                start: 0,
                count: 5,
                tags: vec![(0, 0), (1, 3)]
            }
        );
        assert_eq!(
            b,
            ReadRequest {
                table: HR,
                start: 6,
                count: 8,
                tags: vec![(2, 0), (3, 3), (4, 6)]
            }
        );
        // Recursing ends at one tag each.
        let mut stack = vec![p[0].clone()];
        let mut leaves = Vec::new();
        while let Some(r) = stack.pop() {
            match split(&d, &r) {
                Some((x, y)) => {
                    stack.push(x);
                    stack.push(y);
                }
                None => leaves.push(r),
            }
        }
        leaves.sort_by_key(|r| r.start);
        assert_eq!(leaves.len(), 5);
        for (i, r) in leaves.iter().enumerate() {
            assert_eq!(r.tags, vec![(i, 0)]);
            assert_eq!((r.start, r.count), (i as u16 * 3, 2));
        }
    }

    #[test]
    fn split_keeps_tags_of_one_register_together() {
        let mut a = tag(HR, 5, DataType::Bool);
        a.bit = Some(1);
        let mut b = tag(HR, 5, DataType::Bool);
        b.bit = Some(2);
        let d = device(vec![a, b, tag(HR, 6, DataType::UInt16)]);
        let p = plan(&d, 0..3);
        let (x, y) = split(&d, &p[0]).unwrap();
        assert_eq!(x.tags, vec![(0, 0), (1, 0)]);
        assert_eq!((y.start, y.count, y.tags.clone()), (6, 1, vec![(2, 0)]));
        assert_eq!(split(&d, &x), None);
        assert_eq!(split(&d, &y), None);
    }

    fn arb_device() -> impl Strategy<Value = DeviceSpec> {
        let types = prop::sample::select(vec![
            DataType::UInt16,
            DataType::Float32,
            DataType::UInt64,
            DataType::String { len: 3 },
        ]);
        (
            prop::collection::vec((0u16..300, types), 1..40),
            1u16..20,
            0u16..6,
        )
            .prop_map(|(tags, max_regs, gap)| {
                let mut d = device(tags.into_iter().map(|(a, t)| tag(HR, a, t)).collect());
                d.max_registers_per_read = max_regs;
                d.max_gap = gap;
                d
            })
    }

    proptest! {
        #[test]
        fn plans_keep_their_invariants(d in arb_device()) {
            let all: Vec<usize> = (0..d.tags.len()).collect();
            let p = plan_with_rejects(&d, all.iter().copied());
            prop_assert_eq!(plan_with_rejects(&d, all.iter().rev().copied()), p.clone());
            let mut seen: Vec<usize> = p.rejected.iter().map(|(i, _)| *i).collect();
            let limit = read_limit(&d, HR);
            let mut last_end = 0u32;
            let mut last_start = 0u32;
            for r in &p.requests {
                prop_assert!(r.count >= 1 && r.count <= limit);
                // No overlap unless forced by two overlapping tags wider than the limit.
                let start = u32::from(r.start);
                if start < last_end {
                    let first = r.tags[0].0;
                    let forced = start + u32::from(d.tags[first].data_type.width()) - last_start > u32::from(limit);
                    prop_assert!(forced, "requests overlap at {}", start);
                }
                last_end = start + u32::from(r.count);
                last_start = start;
                for &(i, off) in &r.tags {
                    let t = &d.tags[i];
                    prop_assert_eq!(u32::from(t.address), start + u32::from(off));
                    prop_assert!(off + t.data_type.width() <= r.count);
                    seen.push(i);
                }
            }
            seen.sort_unstable();
            prop_assert_eq!(seen, all);
            for (i, _) in &p.rejected {
                prop_assert!(d.tags[*i].data_type.width() > limit);
            }
        }

        #[test]
        fn splitting_preserves_tags(d in arb_device()) {
            for r in plan(&d, 0..d.tags.len()) {
                if let Some((a, b)) = split(&d, &r) {
                    prop_assert!(!a.tags.is_empty() && !b.tags.is_empty());
                    let mut ids: Vec<usize> = a.tags.iter().chain(&b.tags).map(|t| t.0).collect();
                    let mut orig: Vec<usize> = r.tags.iter().map(|t| t.0).collect();
                    ids.sort_unstable();
                    orig.sort_unstable();
                    prop_assert_eq!(ids, orig);
                    for part in [&a, &b] {
                        prop_assert!(part.start >= r.start);
                        prop_assert!(u32::from(part.start) + u32::from(part.count) <= u32::from(r.start) + u32::from(r.count));
                        for &(i, off) in &part.tags {
                            prop_assert_eq!(d.tags[i].address, part.start + off);
                            prop_assert!(off + d.tags[i].data_type.width() <= part.count);
                        }
                    }
                }
            }
        }
    }
}
