//! Upgrade across a map layout change: an earlier version pinned a flow table whose
//! entries are smaller than this version's. Loading must carry the pinned flows over
//! (common prefix kept, new fields zeroed) instead of failing verification, keep maps
//! whose layout did not change, and drop the old map once the upgrade finishes.
//! Needs root (CAP_BPF, CAP_SYS_ADMIN).

use std::{
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::Path,
};

use aya::maps::{HashMap, Map, MapData};
use canary_agent::datapath::Datapath;
use canary_common::{FlowKey, FlowValue, FLOW_TABLE_SIZE, MAP_FLOWS};

const BPF_MAP_CREATE: i64 = 0;
const BPF_MAP_UPDATE_ELEM: i64 = 2;
const BPF_OBJ_PIN: i64 = 6;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

mod pins;
use pins::Pins;

fn bpf<T>(cmd: i64, attr: &mut T) -> i64 {
    // SAFETY: `attr` is the prefix of `union bpf_attr` that `cmd` reads.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as u32,
        )
    };
    assert!(
        rc >= 0,
        "bpf({cmd}): {} (run as root)",
        std::io::Error::last_os_error()
    );
    rc
}

/// Creates and pins an LRU hash map the way an earlier agent version did.
fn pin_old_flow_table(pin: &Path, value_size: u32) -> OwnedFd {
    #[repr(C)]
    #[derive(Default)]
    struct Create {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let mut create = Create {
        map_type: BPF_MAP_TYPE_LRU_HASH,
        key_size: std::mem::size_of::<FlowKey>() as u32,
        value_size,
        max_entries: FLOW_TABLE_SIZE,
        ..Default::default()
    };
    // SAFETY: the kernel returned a new descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(bpf(BPF_MAP_CREATE, &mut create) as i32) };
    #[repr(C)]
    struct Pin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let path = CString::new(pin.as_os_str().as_bytes()).unwrap();
    let mut attr = Pin {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut attr);
    fd
}

fn insert(fd: &OwnedFd, key: &FlowKey, value: &[u8]) {
    #[repr(C)]
    struct Elem {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut attr = Elem {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const FlowKey as u64,
        value: value.as_ptr() as u64,
        flags: 0,
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr);
}

#[test]
fn pinned_flows_of_a_smaller_layout_are_carried_over() {
    let pins = Pins::new("upgrade");
    std::fs::create_dir_all(&pins.0).unwrap();
    // Everything the earlier version had: its flow table, one entry smaller than now.
    let new_size = std::mem::size_of::<FlowValue>();
    let old_size = new_size - 8;
    {
        // Pins need bpffs: Datapath::load mounts it, so load once and drop the flows pin.
        let dp = Datapath::load(&pins.0).expect("loading the datapath (run as root)");
        drop(dp);
        std::fs::remove_file(pins.0.join(MAP_FLOWS)).unwrap();
    }
    let old = pin_old_flow_table(&pins.0.join(MAP_FLOWS), old_size as u32);
    let key = FlowKey {
        src: [u32::from_ne_bytes([198, 18, 1, 2]), 0, 0, 0],
        dst: [u32::from_ne_bytes([198, 19, 0, 10]), 0, 0, 0],
        sport: 40000u16.to_be(),
        dport: 80u16.to_be(),
        proto: 6,
        family: 4,
        ..Default::default()
    };
    let old_value: Vec<u8> = (1..=old_size as u8).collect();
    insert(&old, &key, &old_value);
    drop(old);

    let mut dp = Datapath::load(&pins.0).expect("an upgrade over an older flow table loads");
    let aside = pins.0.join(format!("{MAP_FLOWS}_UPGRADING"));
    assert!(
        aside.exists(),
        "the old table stays until the upgrade finishes"
    );
    let flows: HashMap<MapData, FlowKey, FlowValue> = HashMap::try_from(Map::LruHashMap(
        MapData::from_pin(pins.0.join(MAP_FLOWS)).unwrap(),
    ))
    .unwrap();
    let carried = flows
        .get(&key, 0)
        .expect("the pinned flow was carried over");
    // SAFETY: FlowValue is plain old data of `new_size` bytes.
    let bytes: &[u8] =
        unsafe { std::slice::from_raw_parts(&carried as *const FlowValue as *const u8, new_size) };
    assert_eq!(&bytes[..old_size], &old_value[..], "common prefix kept");
    assert!(
        bytes[old_size..].iter().all(|b| *b == 0),
        "new fields zeroed"
    );
    dp.finish_upgrade().unwrap();
    assert!(
        !aside.exists(),
        "the old table is dropped after the upgrade"
    );
    // A second start over the upgraded pins has nothing to migrate.
    drop(dp);
    Datapath::load(&pins.0).unwrap();
    assert!(!aside.exists());
}
