"""Contact ID event codes for fire use: the gateway's canonical event taxonomy.

Every signal carries a Contact ID event code (Ademco Contact ID, SIA DC-05), whatever
protocol brought it in. SIA DC-03 two-letter codes map onto the table both ways:

- `to_sia` gives the SIA code for a Contact ID code and qualifier. A status report
  (qualifier 6/P) uses the new-event code, because SIA has no separate "still present" form.
- `from_sia` gives the Contact ID code and qualifier for an SIA code. Where several Contact
  ID codes share one SIA code, the lowest Contact ID code is the canonical one
  (FA -> 110 fire, FT -> 373 fire loop trouble, RP -> 602 periodic test).

Event codes outside fire use (100-109 medical, 120-199 panic, burglary and other alarms,
400-499 open/close and access) are left out on purpose, so that `lookup` rejects them
instead of guessing a class.
"""

from __future__ import annotations

import types
from collections.abc import Mapping

import msgspec

from gateway.signal import EventClass, Qualifier


class EventCode(msgspec.Struct, frozen=True):
    """One Contact ID event code with its class, labels and SIA DC-03 codes.

    `sia_new` and `sia_restore` are empty where SIA DC-03 has no matching code.
    """

    code: str
    event_class: EventClass
    label_en: str
    label_vi: str
    sia_new: str
    sia_restore: str


class UnknownEventCode(LookupError):
    """A Contact ID or SIA event code that is not in the fire-use table."""

    def __init__(self, code: str, message: str | None = None) -> None:
        if message is None:
            message = (
                f"Contact ID event code {code!r} is not in the fire-use table. "
                f"Expected three digits in one of the families {FAMILY_TEXT}"
            )
        super().__init__(message)
        self.code = code


_FIRE = EventClass.FIRE
_SUPERVISORY = EventClass.SUPERVISORY
_TROUBLE = EventClass.TROUBLE
_TEST = EventClass.TEST

# Columns: code, class, SIA new event, SIA restore, English label, Vietnamese label.
# Class rules: 570-577 bypasses are TROUBLE because a disabled zone no longer protects.
# 621-628 event log, clock and programming codes are TROUBLE because they need a technician
# and must never open a fire incident. TEST is kept for the test reports 601-614.
_TABLE: tuple[tuple[str, EventClass, str, str, str, str], ...] = (
    # Fire alarms.
    ("110", _FIRE, "FA", "FR", "Fire alarm", "Báo cháy"),
    ("111", _FIRE, "FA", "FR", "Smoke detector alarm", "Báo cháy: đầu báo khói"),
    ("112", _FIRE, "FA", "FR", "Combustion detector alarm", "Báo cháy: đầu báo sản phẩm cháy"),
    ("113", _FIRE, "SA", "SR", "Sprinkler water flow alarm", "Báo cháy: có dòng chảy trong hệ thống sprinkler"),
    ("114", _FIRE, "KA", "KR", "Heat detector alarm", "Báo cháy: đầu báo nhiệt"),
    ("115", _FIRE, "FA", "FR", "Manual call point alarm", "Báo cháy: nút ấn báo cháy"),
    ("116", _FIRE, "FA", "FR", "Duct detector alarm", "Báo cháy: đầu báo khói đường ống gió"),
    ("117", _FIRE, "FA", "FR", "Flame detector alarm", "Báo cháy: đầu báo lửa"),
    ("118", _FIRE, "FA", "FR", "Fire pre-alarm (near alarm)", "Tiền báo cháy (gần ngưỡng báo cháy)"),
    # Fire supervisory signals.
    ("200", _SUPERVISORY, "FS", "FV", "Fire supervisory", "Tín hiệu giám sát hệ thống chữa cháy"),
    ("201", _SUPERVISORY, "FS", "FV", "Low water pressure", "Giám sát: áp lực nước thấp"),
    ("202", _SUPERVISORY, "FS", "FV", "Low CO2 pressure", "Giám sát: áp suất khí CO2 thấp"),
    ("203", _SUPERVISORY, "FS", "FV", "Gate valve off normal", "Giám sát: van chặn không ở vị trí bình thường"),
    ("204", _SUPERVISORY, "FS", "FV", "Low water level", "Giám sát: mực nước thấp"),
    ("205", _SUPERVISORY, "FS", "FV", "Fire pump running", "Giám sát: bơm chữa cháy đang chạy"),
    ("206", _SUPERVISORY, "FS", "FV", "Fire pump failure", "Giám sát: lỗi bơm chữa cháy"),
    # System troubles.
    ("300", _TROUBLE, "YX", "YZ", "System trouble", "Lỗi hệ thống"),
    ("301", _TROUBLE, "AT", "AR", "Mains power lost", "Mất nguồn điện lưới"),
    ("302", _TROUBLE, "YT", "YR", "Low system battery", "Ắc quy yếu"),
    ("303", _TROUBLE, "YF", "", "RAM checksum error", "Lỗi bộ nhớ RAM (sai tổng kiểm tra)"),
    ("304", _TROUBLE, "YF", "", "ROM checksum error", "Lỗi bộ nhớ ROM (sai tổng kiểm tra)"),
    ("305", _TROUBLE, "YW", "", "System reset", "Hệ thống khởi động lại"),
    ("306", _TROUBLE, "YG", "", "Panel programming changed", "Cài đặt tủ trung tâm báo cháy đã thay đổi"),
    ("307", _TROUBLE, "YX", "YZ", "Self-test failure", "Lỗi tự kiểm tra"),
    ("308", _TROUBLE, "YX", "YZ", "System shutdown", "Hệ thống ngừng hoạt động"),
    ("309", _TROUBLE, "YT", "YR", "Battery test failure", "Lỗi kiểm tra ắc quy"),
    ("310", _TROUBLE, "YX", "YZ", "Ground fault", "Lỗi chạm đất"),
    ("311", _TROUBLE, "YM", "YR", "Battery missing or dead", "Mất ắc quy hoặc ắc quy hỏng"),
    ("312", _TROUBLE, "YI", "YJ", "Power supply overcurrent", "Bộ nguồn quá dòng"),
    ("313", _TROUBLE, "", "", "Engineer reset", "Kỹ thuật viên đặt lại hệ thống"),
    # Sounder, relay and notification circuit troubles.
    ("320", _TROUBLE, "YA", "YH", "Sounder or relay trouble", "Lỗi chuông, còi hoặc rơ-le"),
    ("321", _TROUBLE, "YA", "YH", "Bell 1 trouble", "Lỗi chuông 1"),
    ("322", _TROUBLE, "YA", "YH", "Bell 2 trouble", "Lỗi chuông 2"),
    ("323", _TROUBLE, "OU", "OV", "Alarm relay trouble", "Lỗi rơ-le báo động"),
    ("324", _TROUBLE, "OU", "OV", "Trouble relay trouble", "Lỗi rơ-le báo lỗi"),
    ("325", _TROUBLE, "OU", "OV", "Reversing relay trouble", "Lỗi rơ-le đảo chiều"),
    ("326", _TROUBLE, "YA", "YH", "Notification appliance circuit 3 trouble", "Lỗi mạch thiết bị báo động số 3"),
    ("327", _TROUBLE, "YA", "YH", "Notification appliance circuit 4 trouble", "Lỗi mạch thiết bị báo động số 4"),
    # System peripheral troubles.
    ("330", _TROUBLE, "ET", "ER", "System peripheral trouble", "Lỗi thiết bị ngoại vi"),
    ("331", _TROUBLE, "ET", "ER", "Polling loop open", "Đứt dây mạch vòng hỏi thiết bị ngoại vi"),
    ("332", _TROUBLE, "ET", "ER", "Polling loop short", "Chập mạch mạch vòng hỏi thiết bị ngoại vi"),
    ("333", _TROUBLE, "ET", "ER", "Expansion module failure", "Lỗi mô-đun mở rộng"),
    ("334", _TROUBLE, "ET", "ER", "Repeater failure", "Lỗi bộ lặp tín hiệu"),
    ("335", _TROUBLE, "VO", "VI", "Local printer out of paper", "Máy in tại chỗ hết giấy"),
    ("336", _TROUBLE, "VT", "VR", "Local printer failure", "Lỗi máy in tại chỗ"),
    ("337", _TROUBLE, "ET", "ER", "Expansion module DC power lost", "Mô-đun mở rộng mất nguồn một chiều"),
    ("338", _TROUBLE, "ET", "ER", "Expansion module low battery", "Mô-đun mở rộng ắc quy yếu"),
    ("339", _TROUBLE, "ET", "ER", "Expansion module reset", "Mô-đun mở rộng khởi động lại"),
    ("341", _TROUBLE, "ES", "EJ", "Expansion module tamper", "Mô-đun mở rộng bị mở vỏ"),
    ("342", _TROUBLE, "ET", "ER", "Expansion module mains power lost", "Mô-đun mở rộng mất nguồn điện lưới"),
    ("343", _TROUBLE, "ET", "ER", "Expansion module self-test failure", "Mô-đun mở rộng lỗi tự kiểm tra"),
    ("344", _TROUBLE, "XQ", "XH", "RF receiver jamming detected", "Bộ thu vô tuyến bị gây nhiễu"),
    # Communication troubles.
    ("350", _TROUBLE, "YS", "YK", "Communication trouble", "Lỗi truyền tin"),
    ("351", _TROUBLE, "LT", "LR", "Telephone line 1 fault", "Lỗi đường điện thoại 1"),
    ("352", _TROUBLE, "LT", "LR", "Telephone line 2 fault", "Lỗi đường điện thoại 2"),
    ("353", _TROUBLE, "YS", "YK", "Long-range radio transmitter fault", "Lỗi bộ phát vô tuyến tầm xa"),
    ("354", _TROUBLE, "YC", "YK", "Failure to communicate event", "Không gửi được sự kiện về trung tâm"),
    ("355", _TROUBLE, "YS", "YK", "Loss of radio supervision", "Mất giám sát đường vô tuyến"),
    ("356", _TROUBLE, "YS", "YK", "Loss of central polling", "Mất tín hiệu hỏi vòng từ trung tâm"),
    ("357", _TROUBLE, "YS", "YK", "Long-range radio antenna fault (VSWR)", "Lỗi anten bộ phát vô tuyến tầm xa (VSWR)"),
    # Protection loop troubles.
    ("370", _TROUBLE, "UT", "UJ", "Protection loop trouble", "Lỗi mạch vùng bảo vệ"),
    ("371", _TROUBLE, "UT", "UJ", "Protection loop open", "Đứt dây mạch vùng bảo vệ"),
    ("372", _TROUBLE, "UT", "UJ", "Protection loop short", "Chập mạch mạch vùng bảo vệ"),
    ("373", _TROUBLE, "FT", "FJ", "Fire loop trouble", "Lỗi mạch vùng báo cháy"),
    ("374", _TROUBLE, "EE", "", "Exit error", "Lỗi thoát: vùng còn mở khi hết thời gian trễ"),
    ("375", _TROUBLE, "PT", "PJ", "Panic zone trouble", "Lỗi vùng báo khẩn cấp"),
    ("376", _TROUBLE, "HT", "HJ", "Holdup zone trouble", "Lỗi vùng báo cướp"),
    ("377", _TROUBLE, "BD", "BE", "Swinger trouble", "Lỗi vùng bị ngắt do báo lặp lại"),
    ("378", _TROUBLE, "UT", "UJ", "Cross-zone trouble", "Lỗi vùng xác nhận chéo"),
    # Sensor troubles.
    ("380", _TROUBLE, "UT", "UJ", "Sensor trouble", "Lỗi cảm biến"),
    ("381", _TROUBLE, "UY", "UJ", "Loss of supervision (RF)", "Mất giám sát thiết bị vô tuyến"),
    ("382", _TROUBLE, "EM", "EN", "Loss of supervision (remote point module)", "Mất giám sát mô-đun điểm từ xa"),
    ("383", _TROUBLE, "TT", "TJ", "Sensor tamper", "Cảm biến bị mở vỏ"),
    ("384", _TROUBLE, "XT", "XR", "RF transmitter low battery", "Pin thiết bị vô tuyến yếu"),
    ("385", _TROUBLE, "FT", "FJ", "Smoke detector high sensitivity", "Đầu báo khói có độ nhạy quá cao"),
    ("386", _TROUBLE, "FT", "FJ", "Smoke detector low sensitivity", "Đầu báo khói có độ nhạy quá thấp"),
    ("387", _TROUBLE, "BT", "BJ", "Intrusion detector high sensitivity", "Đầu dò đột nhập có độ nhạy quá cao"),
    ("388", _TROUBLE, "BT", "BJ", "Intrusion detector low sensitivity", "Đầu dò đột nhập có độ nhạy quá thấp"),
    ("389", _TROUBLE, "UT", "UJ", "Sensor self-test failure", "Cảm biến lỗi tự kiểm tra"),
    ("391", _TROUBLE, "NA", "NS", "Sensor watch trouble", "Lỗi giám sát hoạt động cảm biến"),
    ("392", _TROUBLE, "FT", "FJ", "Drift compensation error", "Lỗi bù trôi đầu báo"),
    ("393", _TROUBLE, "AS", "AN", "Maintenance alert (dirty detector)", "Cảnh báo bảo trì: đầu báo bẩn"),
    # Bypasses (zones disabled).
    ("570", _TROUBLE, "UB", "UU", "Zone or sensor disabled", "Vô hiệu hóa vùng hoặc cảm biến"),
    ("571", _TROUBLE, "FB", "FU", "Fire zone disabled", "Vô hiệu hóa vùng báo cháy"),
    ("572", _TROUBLE, "UB", "UU", "24-hour zone disabled", "Vô hiệu hóa vùng 24 giờ"),
    ("573", _TROUBLE, "BB", "BU", "Intrusion zone disabled", "Vô hiệu hóa vùng chống đột nhập"),
    ("574", _TROUBLE, "UB", "UU", "Zone group disabled", "Vô hiệu hóa nhóm vùng"),
    ("575", _TROUBLE, "UB", "UU", "Swinger zone disabled", "Vô hiệu hóa vùng do báo lặp lại"),
    ("576", _TROUBLE, "UB", "UU", "Access zone shunted", "Tạm bỏ qua vùng kiểm soát ra vào"),
    ("577", _TROUBLE, "UB", "UU", "Access point disabled", "Vô hiệu hóa điểm kiểm soát ra vào"),
    # Tests and miscellaneous reports.
    ("601", _TEST, "RX", "", "Manual test report", "Kiểm tra thủ công"),
    ("602", _TEST, "RP", "", "Periodic test report", "Kiểm tra định kỳ"),
    ("603", _TEST, "RP", "", "Periodic RF transmission", "Phát vô tuyến định kỳ"),
    ("604", _TEST, "FI", "FK", "Fire test", "Thử hệ thống báo cháy"),
    ("605", _TEST, "YY", "", "Status report to follow", "Sắp gửi báo cáo trạng thái"),
    ("606", _TEST, "LF", "", "Listen-in to follow", "Sắp bắt đầu nghe trực tiếp tại cơ sở"),
    ("607", _TEST, "TS", "TE", "Walk test mode", "Chế độ thử từng điểm (walk test)"),
    ("608", _TEST, "RY", "", "Periodic test with system trouble present", "Kiểm tra định kỳ, hệ thống đang có lỗi"),
    ("609", _TEST, "", "", "Video transmitter active", "Bộ truyền hình ảnh đang hoạt động"),
    ("611", _TEST, "TP", "", "Point tested OK", "Điểm đã thử đạt"),
    ("612", _TEST, "", "", "Point not tested", "Điểm chưa được thử"),
    ("613", _TEST, "BX", "", "Intrusion zone walk-tested", "Đã thử vùng chống đột nhập"),
    ("614", _TEST, "FX", "", "Fire zone walk-tested", "Đã thử vùng báo cháy"),
    # Event log, clock and programming.
    ("621", _TROUBLE, "", "", "Event log reset", "Nhật ký sự kiện đã bị xóa"),
    ("622", _TROUBLE, "JL", "", "Event log 50% full", "Nhật ký sự kiện đã đầy 50%"),
    ("623", _TROUBLE, "JL", "", "Event log 90% full", "Nhật ký sự kiện đã đầy 90%"),
    ("624", _TROUBLE, "JO", "", "Event log overflow", "Nhật ký sự kiện bị tràn"),
    ("625", _TROUBLE, "JT", "", "Time and date reset", "Ngày giờ đã được đặt lại"),
    ("626", _TROUBLE, "", "", "Time and date inaccurate", "Ngày giờ không chính xác"),
    ("627", _TROUBLE, "LB", "", "Programming mode entered", "Vào chế độ lập trình"),
    ("628", _TROUBLE, "LX", "", "Programming mode exited", "Thoát chế độ lập trình"),
)

# SIA codes that `from_sia` accepts in addition to the table's own. DC-03 has both a restoral
# code (FR, SR, KR: alarm or trouble eliminated), which the table sends, and an alarm-restore
# code (FH, SH, KH), which some panels and converters send instead.
_SIA_ALIASES: dict[str, tuple[str, Qualifier]] = {
    "FH": ("110", Qualifier.RESTORE),
    "SH": ("113", Qualifier.RESTORE),
    "KH": ("114", Qualifier.RESTORE),
}

# Code families as the error messages name them. A test checks that every table code
# falls in one of them.
FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("110", "118", "fire"),
    ("200", "206", "supervisory"),
    ("300", "393", "trouble"),
    ("570", "577", "bypass"),
    ("601", "614", "test"),
    ("621", "628", "event log and programming"),
)
FAMILY_TEXT = ", ".join(f"{first}-{last} {name}" for first, last, name in FAMILIES)

LANGUAGES = ("vi", "en")


def _build_codes() -> Mapping[str, EventCode]:
    codes: dict[str, EventCode] = {}
    for code, event_class, sia_new, sia_restore, label_en, label_vi in _TABLE:
        if code in codes:
            raise ValueError(f"Contact ID code {code} appears twice in the event-code table")
        codes[code] = EventCode(
            code=code,
            event_class=event_class,
            label_en=label_en,
            label_vi=label_vi,
            sia_new=sia_new,
            sia_restore=sia_restore,
        )
    return types.MappingProxyType(codes)


def _build_sia_index(codes: Mapping[str, EventCode]) -> Mapping[str, tuple[str, Qualifier]]:
    """Index SIA codes by the lowest Contact ID code that uses them, then add the aliases."""
    index: dict[str, tuple[str, Qualifier]] = {}
    for code in sorted(codes):
        entry = codes[code]
        for sia, qualifier in ((entry.sia_new, Qualifier.NEW), (entry.sia_restore, Qualifier.RESTORE)):
            if not sia:
                continue
            first = index.setdefault(sia, (code, qualifier))
            # One SIA code must mean one qualifier, or from_sia could not tell new from restore.
            if first[1] is not qualifier:
                raise ValueError(
                    f"SIA code {sia} is a {first[1]} code for {first[0]} and a {qualifier} code for {code}"
                )
    for sia, target in _SIA_ALIASES.items():
        if sia in index:
            raise ValueError(f"SIA alias {sia} is already used by Contact ID code {index[sia][0]}")
        index[sia] = target
    return types.MappingProxyType(index)


CODES: Mapping[str, EventCode] = _build_codes()
_BY_SIA = _build_sia_index(CODES)


def lookup(code: str) -> EventCode:
    """Return the table entry for a three-digit Contact ID code, or raise UnknownEventCode."""
    try:
        return CODES[code]
    except (KeyError, TypeError):
        raise UnknownEventCode(code) from None


def from_sia(sia: str) -> tuple[EventCode, Qualifier]:
    """Return the canonical Contact ID entry and qualifier for an SIA DC-03 event code.

    The code must be two uppercase letters. Lowercase and other shapes raise
    UnknownEventCode like an unknown code does.
    """
    target = _BY_SIA.get(sia) if isinstance(sia, str) else None
    if target is None:
        raise UnknownEventCode(
            sia,
            f"SIA event code {sia!r} has no Contact ID code in the fire-use table. "
            f"Expected two uppercase letters such as FA, FT or RP that map to the families {FAMILY_TEXT}",
        )
    code, qualifier = target
    return CODES[code], qualifier


def to_sia(code: str, qualifier: Qualifier) -> str:
    """Return the SIA DC-03 code for a Contact ID code and qualifier, or "" if SIA has none.

    Raises UnknownEventCode for a code outside the table.
    """
    entry = lookup(code)
    if qualifier == Qualifier.RESTORE:
        return entry.sia_restore
    return entry.sia_new


def label(code: str, language: str = "vi") -> str:
    """Return the label of a Contact ID code in Vietnamese ("vi") or English ("en").

    Locale forms such as "vi_VN" or "en-US" select the same labels. Raises UnknownEventCode
    for a code outside the table and ValueError for another language.
    """
    entry = lookup(code)
    base = language.replace("-", "_").split("_")[0].lower()
    if base == "vi":
        return entry.label_vi
    if base == "en":
        return entry.label_en
    raise ValueError(f"label language {language!r} is not supported. Use one of {', '.join(LANGUAGES)}")
